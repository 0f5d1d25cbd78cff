"""Pieces the UNet finetune and the latent precompute jobs share: models from the config, text conditioning; the
finetune's data feed per rank (`WorkerData`: epochs, exact resume position), its EMA of the UNet weights (diffusers'
`EMAModel`) and its safetensors checkpoint files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtn.errors import MTNError
from mtn.finetune_config import FinetuneConfig


class FinetuneModule(torch.nn.Module):
    """UNet (+ the MTN when it trains jointly) in one module: one DeepSpeed engine, two learning rates."""

    def __init__(self, unet, mtn=None):
        super().__init__()
        self.unet, self.mtn = unet, mtn

    def forward(self, noisy, timesteps, cond):
        # cond: prompt embeddings [B, S_t, d_t], or (source hidden [B, S_s, d_s], mask [B, S_s]) for the MTN
        enc = self.mtn.encode(*cond) if self.mtn is not None else cond  # [B, S_t, d_t]
        return self.unet(noisy, timesteps, encoder_hidden_states=enc).sample  # [B, 4, h, w]


def setup_models(cfg: FinetuneConfig, device, dtype):
    """-> (pipe with UNet/VAE/text encoder, DDPM noise scheduler, translator or None)."""
    from diffusers import DDPMScheduler

    from mtn.pipeline import check_translator, load_pipeline
    from mtn.tiny.sd import build_tiny_sd_pipeline
    from mtn.tiny.translator import build_tiny_translator
    from mtn.translator import load_translator
    from mtn.uris import fetch_folder

    if cfg.pipeline == "tiny":
        pipe = build_tiny_sd_pipeline(seed=cfg.seed)
    else:
        # tiny:sd as load_pipeline builds it; anything else (folder, hub id, s3://, models:/) through the one resolver
        pipe = load_pipeline(cfg.pipeline if cfg.pipeline.startswith("tiny:")
                             else str(fetch_folder(cfg.pipeline, "model_index.json")))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    cross = pipe.unet.config.cross_attention_dim
    if cfg.translator is None:
        translator = None
    elif cfg.translator == "tiny":
        translator = build_tiny_translator(target_dim=cross, seed=cfg.seed)
    else:
        translator = load_translator(fetch_folder(cfg.translator, "translator.json"))
    if translator is not None:
        check_translator(pipe, translator)  # its declared text space: the UNet's width, the tokenizer's length
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.to(device)
    pipe.vae.to(dtype=dtype)
    if translator is not None:
        translator.to(device=device)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return pipe, noise_scheduler, translator


def conditioning(cfg: FinetuneConfig, pipe, translator, captions: list[str], device):
    """Prompt embeddings [B, S_t, d_t] from the frozen route, or (hidden, mask) when the MTN trains."""
    with torch.no_grad():
        if translator is None:  # plain SD finetune with its own text encoder
            return pipe.encode_prompt(captions, device, 1, False)[0]
        if cfg.train_mtn:
            hidden, mask = translator.source_encoder(captions, zero_pad=True)  # [B, S_s, d_s], [B, S_s]
            return hidden.to(device), mask.to(device)
        return translator.encode(captions).to(device)


def ensure_shards(cfg: FinetuneConfig) -> list[str]:
    """The shard list; with `generate_shards`, toy shards are written first when the source holds none."""
    from mtn.data.shards import list_shards
    from mtn.tiny.shards import write_tiny_shards

    if cfg.generate_shards:
        try:
            list_shards(cfg.train_shards)
        except MTNError:
            print(f"writing {cfg.generate_shards} toy shards to {cfg.train_shards}")
            write_tiny_shards(cfg.train_shards, num_shards=cfg.generate_shards, per_shard=32, size=cfg.resolution * 2,
                              seed=cfg.seed)
    shards = list_shards(cfg.train_shards)
    print(f"{len(shards)} shards from {cfg.train_shards}")
    return shards


@torch.no_grad()
def validation_grid(cfg: FinetuneConfig, pipe, translator, unet):
    """Fixed prompts and seeds -> one PIL grid (a row per prompt, 2 images at the training resolution)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import make_image_grid

    from mtn.pipeline import generate

    val_pipe = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                       unet=unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    val_pipe.set_progress_bar_config(disable=True)
    prompts = cfg.val_prompts
    was_training = unet.training
    unet.eval()
    images = generate(val_pipe, translator, prompts, seeds=[cfg.val_seed] * len(prompts), num_images=2,
                      num_inference_steps=cfg.val_steps, guidance_scale=cfg.val_guidance_scale,
                      width=cfg.resolution, height=cfg.resolution)
    unet.train(was_training)
    return make_image_grid(images, rows=len(prompts), cols=2)


EMA_TENSORS, EMA_STATE = "ema.safetensors", "ema.json"


def make_ema(unet, decay: float):
    """diffusers' EMAModel over the UNet's parameters, fp32 shadow copies on their device. Its decay at update n
    (1-based) is 0 for the first update (the shadow starts as the weights), then min(decay, n / (9 + n))."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(unet.parameters(), decay=decay)
    ema.to(dtype=torch.float32)
    return ema


def save_ema(ema, folder: Path) -> None:
    """The shadow weights as safetensors ({"0": ..., "1": ...} in parameter order) + the scalars as JSON (no pickle)."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(folder / EMA_TENSORS))
    (folder / EMA_STATE).write_text(json.dumps(state))


def load_ema(ema, folder: Path) -> None:
    """Restore what `save_ema` wrote into `ema` (its shadow weights stay on their device)."""
    from safetensors.torch import load_file

    tensors = load_file(folder / EMA_TENSORS)
    if len(tensors) != len(ema.shadow_params):
        raise MTNError(f"{folder / EMA_TENSORS} holds {len(tensors)} EMA tensors, the UNet has "
                       f"{len(ema.shadow_params)} parameters: the checkpoint is of another model")
    device = ema.shadow_params[0].device
    shadow = [tensors[str(i)].to(device, torch.float32) for i in range(len(tensors))]
    ema.load_state_dict({**json.loads((folder / EMA_STATE).read_text()), "shadow_params": shadow})


def open_data(cfg: FinetuneConfig, rank: int, world: int, epoch: int, skip_batches: int, lanes: int = 1):
    """This rank's batches of one epoch, `skip_batches` in: dicts of precomputed latents + text features
    (cfg.precomputed, mtn/data/latents.py) or of images + captions (webdataset shards, mtn/data/shards.py, read as
    `lanes` sub-streams whatever the number of loader processes)."""
    from mtn.data.loader import make_loader
    from mtn.data.shards import ShardStream, StreamConfig, list_shards

    if cfg.precomputed:  # latents + text features from jobs/precompute_latents.py: no VAE / text encoder per step
        from mtn.data.latents import LatentBatches

        return LatentBatches(cfg.precomputed, rank, world, cfg.micro_batch, cfg.seed, epoch, skip_batches)

    stream_cfg = StreamConfig(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                              shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                              min_caption_chars=cfg.min_caption_chars, min_image_size=cfg.min_image_size,
                              max_skipped_shard_fraction=cfg.max_skipped_shard_fraction, lanes=lanes)
    stream = ShardStream(list_shards(cfg.train_shards), stream_cfg, rank=rank, world_size=world, epoch=epoch,
                         skip_batches=skip_batches, batch_size=cfg.micro_batch)
    return make_loader(stream, cfg.micro_batch, num_workers=cfg.loader_workers)


@dataclass
class WorkerData:
    """One rank's batches across epochs: its position (epoch, batches into it, and the lanes the epoch is read as;
    checkpointed for an exact mid-epoch resume), the time spent waiting for data, and the loader's skip counts summed
    over the run. The lanes fix the batch order, so a resume finishes its epoch with the saved ones and only the next
    epoch takes a changed loader_workers."""

    cfg: FinetuneConfig
    rank: int
    world: int
    pos: dict = field(default_factory=lambda: {"epoch": 0, "batches": 0})
    skipped: dict = field(default_factory=dict)
    wait_s: float = 0.0
    loader: object = None  # opened at the first batch, after a resume restored `pos`

    def open(self):
        if self.pos["batches"] == 0 or "lanes" not in self.pos:  # an epoch's start (or a checkpoint without lanes)
            self.pos["lanes"] = max(1, self.cfg.loader_workers)
        return iter(open_data(self.cfg, self.rank, self.world, self.pos["epoch"], self.pos["batches"],
                              self.pos["lanes"]))

    def next(self) -> dict:
        t0 = time.perf_counter()
        if self.loader is None:
            self.loader = self.open()
        try:
            batch = next(self.loader)
        except StopIteration:  # this rank's share of the epoch is done: the next epoch reshuffles shards
            self.pos.update(epoch=self.pos["epoch"] + 1, batches=0)
            self.loader = self.open()
            batch = next(self.loader)
        self.wait_s += time.perf_counter() - t0
        self.pos["batches"] += 1
        for k, v in batch.pop("stats", {}).items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        return batch
