"""Finetune a diffusion UNet on text from a new language model through an MTN (the paper's "T5+MTN+FT" stage).

    python jobs/finetune_unet.py                                     # jobs/configs/finetune_local.yaml: tiny, CPU
    python jobs/finetune_unet.py --config jobs/configs/finetune_sd14_t5.yaml
    ray job submit --working-dir . -- python jobs/finetune_unet.py --config jobs/configs/finetune_sd14_t5.yaml

Streams img2dataset webdataset shards (s3:// or local; mtn/data/shards.py) into each Ray Train worker, encodes
the captions with the frozen source LM + MTN (or trains the MTN jointly at `mtn_lr`), encodes images with the
frozen VAE, and trains the UNet on the DDPM loss (epsilon or v from the scheduler config, optional min-SNR-gamma,
noise offset, caption dropout) under DeepSpeed ZeRO. Checkpoints (DeepSpeed shards, EMA, each rank's data
position) go through `ray.train.report` to `storage_path`; a failed worker is replaced and training resumes
from the last checkpoint mid-epoch (`max_failures`). Rank 0 logs losses, throughput, data-wait time and a
fixed-seed validation grid to MLflow, and saves the final pipeline (EMA weights when enabled) + the translator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from mtn.config import REPO_ROOT, load_config
from mtn.diffusion import EMA, diffusion_loss, drop_captions, image_grid, sample_noise
from mtn.errors import MTNError
from mtn.finetune import FinetuneModule, conditioning, ensure_shards, setup_models
from mtn.finetune_config import FinetuneConfig
from mtn.train.checkpoint import (
    final_state,
    fit,
    load_checkpoint,
    lr_factor,
    print_summary,
    report,
)
from mtn.train.preemption import EXIT_CODE, Preempted, StopOnSigterm, StopSignal
from mtn.train.tracking import RunTracker, upload_outputs

DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "finetune_local.yaml"


# ----------------------------------------------------------------------------------------------- setup
def deepspeed_config(cfg: FinetuneConfig) -> dict:
    zero = {"stage": cfg.zero_stage, **({"offload_optimizer": {"device": "cpu"}} if cfg.offload_optimizer else {})}
    return {"train_micro_batch_size_per_gpu": cfg.micro_batch, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": cfg.precision == "bf16"},
            "fp16": {"enabled": cfg.precision == "fp16"}, "steps_per_print": 10**9}


def setup_engine(cfg: FinetuneConfig, pipe, translator):
    """DeepSpeed engine over UNet (+ MTN); our AdamW keeps one lr per group, LambdaLR scales both alike."""
    import deepspeed

    mtn = translator.mtn if (cfg.train_mtn and translator is not None) else None
    module = FinetuneModule(pipe.unet, mtn)
    groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": cfg.lr}]
    if mtn is not None:
        groups.append({"params": [p for p in mtn.parameters() if p.requires_grad], "lr": cfg.mtn_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps))
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg))
    return engine


def setup_data(cfg: FinetuneConfig, rank: int, world: int, epoch: int, skip_batches: int):
    from mtn.data.shards import ShardStream, StreamConfig, list_shards, make_loader

    if cfg.precomputed:  # latents + text features from jobs/precompute_latents.py: no VAE / text encoder per step
        from mtn.data.latents import LatentBatches

        return LatentBatches(cfg.precomputed, rank, world, cfg.micro_batch, cfg.seed, epoch, skip_batches)

    stream_cfg = StreamConfig(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                              shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                              min_caption_chars=cfg.min_caption_chars, min_image_size=cfg.min_image_size,
                              max_skipped_shard_fraction=cfg.max_skipped_shard_fraction)
    stream = ShardStream(list_shards(cfg.train_shards), stream_cfg, rank=rank, world_size=world, epoch=epoch,
                         skip_batches=skip_batches, batch_size=cfg.micro_batch)
    return make_loader(stream, cfg.micro_batch, num_workers=cfg.loader_workers)


# ----------------------------------------------------------------------------------------------- one step
def micro_step(cfg, engine, pipe, noise_scheduler, translator, batch, gen: torch.Generator, rng: random.Random,
               dtype, empty=None) -> float:
    """One micro-batch forward/backward. `empty`: the empty prompt's text features (precomputed mode only)."""
    device = engine.device
    if "latent_mean" in batch:  # precomputed: sample the stored VAE posterior
        mean = batch["latent_mean"].to(device, torch.float32)  # [b, 4, h, w]
        latents = mean + batch["latent_std"].to(device, torch.float32) * torch.randn(
            mean.shape, generator=gen, device=device)
        cond = precomputed_conditioning(cfg, batch, empty, rng, device)
    else:
        pixels = batch["pixel_values"].to(device, dtype)  # [b, 3, R, R] in [-1, 1]
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
        cond = conditioning(cfg, pipe, translator, drop_captions(batch["captions"], cfg.caption_dropout, rng), device)
    latents = latents.to(dtype)  # [b, 4, R/f, R/f]
    noise = sample_noise(latents, gen, cfg.noise_offset)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen,
                      device=device)  # [b]
    noisy = noise_scheduler.add_noise(latents, noise, t)
    cond = tuple(c.to(dtype) if c.is_floating_point() else c for c in cond) if isinstance(cond, tuple) \
        else cond.to(dtype)
    loss = diffusion_loss(engine(noisy, t, cond), latents, noise, t, noise_scheduler, cfg.snr_gamma)
    engine.backward(loss)
    engine.step()
    return loss.item()


def precomputed_conditioning(cfg, batch, empty, rng: random.Random, device):
    """Stored text features, with caption dropout applied as rows replaced by the empty prompt's features
    (`empty`: [1, S, d] or ([1, S_s, d_s], [1, S_s]), encoded once per run)."""
    drop = torch.tensor([rng.random() < cfg.caption_dropout for _ in range(len(batch["latent_mean"]))])  # [b]
    if "text" in batch:
        text = batch["text"].to(device, torch.float32)  # [b, S_t, d_t]
        return torch.where(drop.to(device)[:, None, None], empty.float().expand_as(text), text)
    src, mask = batch["source"].to(device, torch.float32), batch["source_mask"].to(device)  # [b, S_s, d_s], [b, S_s]
    src = torch.where(drop.to(device)[:, None, None], empty[0].float().expand_as(src), src)
    mask = torch.where(drop.to(device)[:, None], empty[1].expand_as(mask), mask)
    return src, mask


# ----------------------------------------------------------------------------------------------- outputs
def gathered(engine, cfg: FinetuneConfig):
    """Whole weights for rank 0's pipeline calls: a no-op unless ZeRO-3 shards the parameters."""
    if cfg.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


@torch.no_grad()
def validation_grid(cfg: FinetuneConfig, pipe, translator, unet):
    """Fixed prompts and seeds -> one PIL grid (a row per prompt, images at the training resolution)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mtn.pipeline import generate

    val_pipe = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                       unet=unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    val_pipe.set_progress_bar_config(disable=True)
    prompts = cfg.prompts
    was_training = unet.training
    unet.eval()
    images = generate(val_pipe, translator, prompts, seeds=[cfg.val_seed] * len(prompts), num_images=2,
                      num_inference_steps=cfg.val_steps, guidance_scale=cfg.val_guidance_scale,
                      width=cfg.resolution, height=cfg.resolution)
    unet.train(was_training)
    return image_grid(images, cols=2)


def save_final(tmp: Path, cfg, pipe, translator, engine, ema, state) -> None:
    """Rank 0: pipeline/ (EMA weights when enabled) and translator/ with save_pretrained (the driver uploads and
    registers them in MLflow after publishing them)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(engine.module.unet.config)
    unet.load_state_dict({k: v.detach().float().cpu() for k, v in engine.module.unet.state_dict().items()})
    if ema is not None:
        ema.copy_to(unet.parameters())
    final = type(pipe)(**{**pipe.components, "unet": unet})
    final.to("cpu", torch.float32).save_pretrained(tmp / "pipeline")
    if translator is not None:
        translator.mtn.float().cpu()
        translator.save(tmp / "translator", training={"finetune": cfg.to_dict(), "steps": state["step"]})
    (tmp / "metrics.json").write_text(json.dumps(state.get("final_metrics", {}), indent=2))


# ----------------------------------------------------------------------------------------------- loop
def checkpoint_extra(rank: int, data_pos: dict, ema):
    """Per-rank data position (exact mid-epoch resume) and rank 0's EMA weights, beside the DeepSpeed shards."""
    from safetensors.torch import save_file

    def write(d: Path) -> None:
        (d / f"data_rank{rank}.json").write_text(json.dumps(data_pos))
        if ema is not None:
            st = ema.state_dict()
            save_file(st["shadow"], str(d / "ema.safetensors"))
            (d / "ema.json").write_text(json.dumps({"decay": st["decay"], "updates": st["updates"]}))

    return write


def restore_extra(rank: int, data_pos: dict, ema):
    from safetensors.torch import load_file

    def read(d: Path) -> None:
        if (d / f"data_rank{rank}.json").is_file():
            data_pos.update(json.loads((d / f"data_rank{rank}.json").read_text()))
        else:  # another world size than the checkpoint's: positions do not map, restart the epoch
            print(f"rank {rank}: no data position in the checkpoint (world size changed?); epoch restarts")
        if ema is not None and (d / "ema.safetensors").is_file():
            ema.load_state_dict({**json.loads((d / "ema.json").read_text()), "shadow": load_file(d / "ema.safetensors")})

    return read


def train_loop_per_worker(config: dict):
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    cfg = FinetuneConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    pipe, noise_scheduler, translator = setup_models(cfg, device, dtype)
    engine = setup_engine(cfg, pipe, translator)
    ema = EMA(engine.module.unet.parameters(), cfg.ema_decay) if cfg.ema_decay and rank == 0 else None
    data_pos = {"epoch": 0, "batches": 0}
    state = load_checkpoint(engine, {"step": 0, "mlflow_run_id": None, "history": []},
                            restore_extra(rank, data_pos, ema), config=config)
    if rank == 0 and state["step"]:
        print(f"resuming from the checkpoint at step {state['step']} (epoch {data_pos['epoch']}, "
              f"{data_pos['batches']} batches into it)")
    # never raises: MLflow may be down; SIGTERM to the driver -> checkpoint and return (mtn/train/preemption.py)
    tracker = RunTracker(cfg, state["mlflow_run_id"], job="finetune_unet") if rank == 0 else None
    stop = StopSignal(cfg.name, engine.device)
    loader = iter(setup_data(cfg, rank, world, data_pos["epoch"], data_pos["batches"]))
    # the frozen route's encoding of "" for caption dropout on stored features: once, not per micro-batch
    empty = conditioning(cfg, pipe, translator, [""], device) if cfg.precomputed else None
    bar = tqdm(total=cfg.max_steps, desc="finetune_unet") if rank == 0 else None
    if bar:
        bar.update(state["step"])
    engine.module.train()
    skipped: dict[str, int] = {}
    t_start, images, wait = time.perf_counter(), 0, 0.0
    for step in range(state["step"] + 1, cfg.max_steps + 1):
        losses = []
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(loader)
            except StopIteration:  # this rank's share of the epoch is done: the next epoch reshuffles shards
                data_pos.update(epoch=data_pos["epoch"] + 1, batches=0)
                loader = iter(setup_data(cfg, rank, world, data_pos["epoch"], 0))
                batch = next(loader)
            wait += time.perf_counter() - t0
            data_pos["batches"] += 1
            for k, v in batch.get("stats", {}).items():
                skipped[k] = skipped.get(k, 0) + v
            gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank * 17 + micro)
            rng = random.Random(cfg.seed * 7919 + step * 31 + rank * 3 + micro)
            losses.append(micro_step(cfg, engine, pipe, noise_scheduler, translator, batch, gen, rng, dtype, empty))
            images += len(batch["latent_mean"] if "latent_mean" in batch else batch["captions"])
        if ema is not None:
            ema.update()
        state["step"] = step
        elapsed = time.perf_counter() - t_start
        metrics = {"step": step, "train/loss": sum(losses) / len(losses), "train/lr": engine.get_lr()[0],
                   "perf/images_per_s": images * world / elapsed, "perf/images_per_s_per_worker": images / elapsed,
                   "perf/data_wait_frac": wait / elapsed, "epoch": data_pos["epoch"],
                   **{f"data/{k}": v for k, v in skipped.items()}}
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            with gathered(engine, cfg):
                if rank == 0:
                    grid = validation_grid(cfg, pipe, translator, engine.module.unet)
                    tracker.log_image(grid, f"validation/step_{step:06d}.png")
            engine.module.train()
        if tracker:
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                tracker.log_metrics(metrics, step)
                state["mlflow_run_id"] = tracker.run_id
                state["history"].append({k: v for k, v in metrics.items() if k.startswith(("train/", "perf/"))})
            bar.update(1)
            bar.set_description(f"finetune_unet loss {metrics['train/loss']:.4f}")
        extra = checkpoint_extra(rank, data_pos, ema)
        if step == cfg.max_steps:
            state["final_metrics"] = {k: v for k, v in metrics.items() if k != "step"}
            if bar:
                bar.close()
                bar = None

            def final(d: Path, extra=extra):
                extra(d)
                with gathered(engine, cfg):
                    if rank == 0:
                        save_final(d, cfg, pipe, translator, engine, ema, state)

            report(engine, state, metrics, rank, final)
        elif stop.check() or step % cfg.checkpoint_every == 0:  # every rank calls check() at every step
            report(engine, state, metrics, rank, extra)
            if stop.stopping:
                if rank == 0:
                    print(f"stop requested: checkpoint saved at step {step}", flush=True)
                break
    if bar:
        bar.close()
    if tracker:  # the run stays RUNNING for the driver's upload, unless preempted
        tracker.close("KILLED" if stop.stopping else None)


# ----------------------------------------------------------------------------------------------- driver
def prepare(cfg: FinetuneConfig) -> FinetuneConfig:
    """Absolute local paths (workers run elsewhere), MLflow default, toy shards when asked; fail fast on data."""
    for key in ("output_dir", "storage_path", "train_shards"):  # a folder, glob or list file: made absolute
        if "://" not in getattr(cfg, key):
            setattr(cfg, key, str(Path(getattr(cfg, key)).expanduser().resolve()))
    cfg.mlflow_tracking_uri = (cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                               or f"sqlite:///{cfg.output_dir}/mlflow.db")
    if "://" not in cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.precomputed:
        from mtn.data.latents import check_manifest, read_manifest

        if "://" not in cfg.precomputed:
            cfg.precomputed = str(Path(cfg.precomputed).resolve())
        manifest = read_manifest(cfg.precomputed)
        check_manifest(manifest, cfg.pipeline, cfg.translator, cfg.resolution,
                       "source" if cfg.train_mtn else "prompt_embeds")
        print(f"{manifest['rows']} precomputed samples in {len(manifest['files'])} files from {cfg.precomputed}")
        return cfg
    ensure_shards(cfg)
    return cfg


def publish(cfg: FinetuneConfig, result) -> dict | None:
    state = final_state(result, cfg.output_dir, "pipeline", ("pipeline", "translator", "metrics.json"))
    if state is None:
        return None
    at = {name: state["published"].get(name, f"{cfg.output_dir}/{name}") for name in ("pipeline", "translator")}
    summary = {"pipeline": at["pipeline"], "translator": at["translator"], "checkpoint": result.checkpoint.path,
               "mlflow_tracking_uri": cfg.mlflow_tracking_uri,
               "mlflow_run_id": state.get("mlflow_run_id"), "steps": state["step"]}
    print_summary("finetune_unet", summary, state.get("final_metrics", {}))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=10")
    args = p.parse_args(argv)
    try:
        cfg = prepare(load_config(args.config, args.overrides, cls=FinetuneConfig))
        stop = StopOnSigterm(cfg.name, cfg.stop_timeout_s)
        with stop:
            result = fit(train_loop_per_worker, cfg, on_ray_ready=stop.install)
        stop.raise_if_preempted(result, cfg.max_steps)
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        return EXIT_CODE
    try:
        summary = publish(cfg, result)  # the final checkpoint is saved and published before anything goes to MLflow
    except MTNError as e:  # e.g. the storage failed mid-publish: the previous output stays, a re-run publishes
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary:
        upload_outputs(cfg.mlflow_tracking_uri, summary["mlflow_run_id"],
                       {"pipeline": summary["pipeline"], "translator": summary["translator"]},
                       cfg.register_model, "pipeline", experiment=cfg.mlflow_experiment, run_name=cfg.name)
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
