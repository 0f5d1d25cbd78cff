"""Pieces the UNet finetune and the latent precompute jobs share: models from the config, text conditioning."""

from __future__ import annotations

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

    from mtn.pipeline import build_tiny_sd_pipeline, build_tiny_translator, load_pipeline
    from mtn.translator import load_translator
    from mtn.uris import fetch_folder

    if cfg.pipeline == "tiny":
        pipe = build_tiny_sd_pipeline(seed=cfg.seed)
    else:
        pipe = load_pipeline(str(fetch_folder(cfg.pipeline, "model_index.json")) if "://" in cfg.pipeline
                             or cfg.pipeline.startswith(("runs:/", "models:/")) else cfg.pipeline)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    cross = pipe.unet.config.cross_attention_dim
    if cfg.translator is None:
        translator = None
    elif cfg.translator == "tiny":
        translator = build_tiny_translator(target_dim=cross, seed=cfg.seed)
    else:
        translator = load_translator(fetch_folder(cfg.translator, "translator.json"))
    if translator is not None and translator.target_shape[1] != cross:
        raise MTNError(f"the translator outputs d_t={translator.target_shape[1]}, the UNet needs {cross}")
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
    from mtn.data.shards import list_shards, write_tiny_shards

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
