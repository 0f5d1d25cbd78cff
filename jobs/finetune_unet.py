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

import contextlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtn.cli import job_parser
from mtn.config import load_config
from mtn.diffusion import diffusion_loss, drop_captions, sample_noise
from mtn.finetune import (
    FinetuneModule,
    WorkerData,
    conditioning,
    ensure_shards,
    load_ema,
    make_ema,
    save_ema,
    setup_models,
    validation_grid,
)
from mtn.finetune_config import FinetuneConfig
from mtn.train.checkpoint import final_state, load_checkpoint, report
from mtn.train.deepspeed import initialize_engine
from mtn.train.fit import exit_code, fit_or_preempt, print_summary
from mtn.train.precision import input_dtype
from mtn.train.preemption import StopSignal
from mtn.train.tracking import RunTracker, upload_outputs

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_local.yaml"


# ----------------------------------------------------------------------------------------------- setup
def setup_engine(cfg: FinetuneConfig, pipe, translator):
    """DeepSpeed engine over UNet (+ MTN when it trains jointly): one param group per model, each its own lr."""
    mtn = translator.mtn if (cfg.train_mtn and translator is not None) else None
    groups = [{"params": [p for p in pipe.unet.parameters() if p.requires_grad], "lr": cfg.lr}]
    if mtn is not None:
        groups.append({"params": [p for p in mtn.parameters() if p.requires_grad], "lr": cfg.mtn_lr})
    return initialize_engine(FinetuneModule(pipe.unet, mtn), groups, cfg, cfg.micro_batch, cfg.grad_accum)


@dataclass
class Worker:
    """What one rank trains with (built by `setup_worker`)."""

    cfg: FinetuneConfig
    rank: int
    world: int
    dtype: torch.dtype
    pipe: object  # the diffusers pipeline: UNet (trained), VAE and text encoder (frozen)
    noise_scheduler: object  # DDPM: the training noise schedule and target (epsilon | v_prediction)
    translator: object  # source LM + MTN, or None (the pipeline's own text encoder)
    engine: object  # DeepSpeed engine over FinetuneModule
    ema: object  # diffusers EMAModel of the UNet (rank 0, ema_decay > 0) or None
    data: WorkerData
    state: dict  # the loop state checkpointed by rank 0: step, mlflow_run_id, history
    empty: object  # precomputed mode: the frozen route's features of "" for caption dropout, else None


def setup_worker(config: dict) -> Worker:
    """Models, the DeepSpeed engine and EMA, then the latest checkpoint (engine, EMA, data position) if any."""
    import ray.train

    cfg = FinetuneConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    dtype = input_dtype(cfg.precision)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    pipe, noise_scheduler, translator = setup_models(cfg, device, dtype)
    engine = setup_engine(cfg, pipe, translator)
    ema = make_ema(engine.module.unet, cfg.ema_decay) if cfg.ema_decay and rank == 0 else None
    data = WorkerData(cfg, rank, world)
    state = load_checkpoint(engine, {"step": 0, "mlflow_run_id": None, "history": []},
                            restore_extra(rank, world, data.pos, ema), config=config)
    if rank == 0 and state["step"]:
        print(f"resuming from the checkpoint at step {state['step']} (epoch {data.pos['epoch']}, "
              f"{data.pos['batches']} batches into it)")
    # the frozen route's encoding of "" for caption dropout on stored features: once, not per micro-batch
    empty = conditioning(cfg, pipe, translator, [""], device) if cfg.precomputed else None
    return Worker(cfg, rank, world, dtype, pipe, noise_scheduler, translator, engine, ema, data, state, empty)


# ----------------------------------------------------------------------------------------------- one step
def micro_rngs(seed: int, step: int, rank: int, micro: int, device) -> tuple[torch.Generator, random.Random]:
    """Independent random streams of one micro-batch: torch (VAE posterior sample, noise, timesteps) and python
    (caption dropout). numpy's SeedSequence(seed, spawn_key=(step, rank, micro)) hashes the whole tuple, so distinct
    tuples get distinct streams (a weighted sum like seed * p + step * q + rank * r collides) and a resumed step
    draws exactly what it drew the first time."""
    torch_seed, python_seed = np.random.SeedSequence(seed, spawn_key=(step, rank, micro)).generate_state(2, np.uint64)
    return torch.Generator(device).manual_seed(int(torch_seed)), random.Random(int(python_seed))


def stored_latents(w: Worker, batch: dict, gen: torch.Generator, rng: random.Random):
    """Precomputed batch -> (latents [b, 4, h, w] sampled from the stored VAE posterior, conditioning): the stored
    text features with caption dropout as rows replaced by the empty prompt's (`w.empty`: [1, S, d], or
    ([1, S_s, d_s], [1, S_s]) when the MTN trains, as mtn/finetune.conditioning gives)."""
    device = w.engine.device
    mean = batch["latent_mean"].to(device, torch.float32)  # [b, 4, h, w]
    latents = mean + batch["latent_std"].to(device, torch.float32) * torch.randn(mean.shape, generator=gen,
                                                                                 device=device)
    drop = torch.tensor([rng.random() < w.cfg.caption_dropout for _ in range(len(mean))], device=device)  # [b]
    if not w.cfg.train_mtn:  # the manifest's text kind "prompt_embeds" (checked in prepare)
        text = batch["text"].to(device, torch.float32)  # [b, S_t, d_t]
        return latents, torch.where(drop[:, None, None], w.empty.float().expand_as(text), text)
    src, mask = batch["source"].to(device, torch.float32), batch["source_mask"].to(device)  # [b, S_s, d_s], [b, S_s]
    src = torch.where(drop[:, None, None], w.empty[0].float().expand_as(src), src)
    return latents, (src, torch.where(drop[:, None], w.empty[1].expand_as(mask), mask))


def encoded_latents(w: Worker, batch: dict, gen: torch.Generator, rng: random.Random):
    """Image batch -> (latents [b, 4, R/f, R/f] from the frozen VAE, conditioning of the dropped-out captions)."""
    device = w.engine.device
    pixels = batch["pixel_values"].to(device, w.dtype)  # [b, 3, R, R] in [-1, 1]
    with torch.no_grad():
        latents = w.pipe.vae.encode(pixels).latent_dist.sample(generator=gen) * w.pipe.vae.config.scaling_factor
    captions = drop_captions(batch["captions"], w.cfg.caption_dropout, rng)
    return latents, conditioning(w.cfg, w.pipe, w.translator, captions, device)


def micro_step(w: Worker, batch: dict, gen: torch.Generator, rng: random.Random) -> tuple[float, int]:
    """One micro-batch forward/backward (DeepSpeed steps the optimizer at the last of grad_accum) -> (loss, rows)."""
    latents, cond = (stored_latents if w.cfg.precomputed else encoded_latents)(w, batch, gen, rng)
    latents = latents.to(w.dtype)  # [b, 4, h, w]
    noise = sample_noise(latents, gen, w.cfg.noise_offset)
    t = torch.randint(0, w.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen,
                      device=latents.device)  # [b]
    noisy = w.noise_scheduler.add_noise(latents, noise, t)
    cond = tuple(c.to(w.dtype) if c.is_floating_point() else c for c in cond) if isinstance(cond, tuple) \
        else cond.to(w.dtype)
    loss = diffusion_loss(w.engine(noisy, t, cond), latents, noise, t, w.noise_scheduler, w.cfg.snr_gamma)
    w.engine.backward(loss)
    w.engine.step()
    return loss.item(), len(latents)


def train_step(w: Worker, step: int) -> tuple[float, int]:
    """One optimizer step: grad_accum micro-batches, then the EMA -> (mean loss, rows this rank trained on)."""
    losses, rows = [], 0
    for micro in range(w.cfg.grad_accum):
        batch = w.data.next()
        loss, n = micro_step(w, batch, *micro_rngs(w.cfg.seed, step, w.rank, micro, w.engine.device))
        losses.append(loss)
        rows += n
    if w.ema is not None:
        w.ema.step(w.engine.module.unet.parameters())
    return sum(losses) / len(losses), rows


def step_metrics(w: Worker, step: int, loss: float, images: int, elapsed: float) -> dict:
    """`images`: rows this rank trained on since this attempt started, `elapsed` seconds ago."""
    return {"step": step, "train/loss": loss, "train/lr": w.engine.get_lr()[0],
            "perf/images_per_s": images * w.world / elapsed, "perf/images_per_s_per_worker": images / elapsed,
            "perf/data_wait_frac": w.data.wait_s / elapsed, "epoch": w.data.pos["epoch"],
            **{f"data/{k}": v for k, v in w.data.skipped.items()}}


# ----------------------------------------------------------------------------------------------- outputs
def gathered(engine, cfg: FinetuneConfig):
    """Whole weights for rank 0's pipeline calls: a no-op unless ZeRO-3 shards the parameters."""
    if cfg.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def validate(w: Worker, step: int, tracker) -> None:
    """Every rank enters (ZeRO-3 gathers the weights collectively); rank 0 renders and logs the grid."""
    with gathered(w.engine, w.cfg):
        if w.rank == 0:
            grid = validation_grid(w.cfg, w.pipe, w.translator, w.engine.module.unet)
            tracker.log_image(grid, f"validation/step_{step:06d}.png")
    w.engine.module.train()


def save_final(tmp: Path, w: Worker) -> None:
    """Rank 0: pipeline/ (EMA weights when enabled) and translator/ with save_pretrained (the driver uploads and
    registers them in MLflow after publishing them)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(w.engine.module.unet.config)
    unet.load_state_dict({k: v.detach().float().cpu() for k, v in w.engine.module.unet.state_dict().items()})
    if w.ema is not None:
        w.ema.copy_to(unet.parameters())
    final = type(w.pipe)(**{**w.pipe.components, "unet": unet})
    final.to("cpu", torch.float32).save_pretrained(tmp / "pipeline")
    if w.translator is not None:
        w.translator.mtn.float().cpu()
        w.translator.save(tmp / "translator", training={"finetune": w.cfg.to_dict(), "steps": w.state["step"]})
    (tmp / "metrics.json").write_text(json.dumps(w.state.get("final_metrics", {}), indent=2))


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_extra(w: Worker, final: bool = False):
    """Per-rank data position (exact mid-epoch resume) and rank 0's EMA weights, beside the DeepSpeed shards;
    `final`: also the pipeline + translator to publish (every rank enters: ZeRO-3 gathers collectively)."""

    def write(d: Path) -> None:
        (d / f"data_rank{w.rank}.json").write_text(json.dumps(w.data.pos))
        if w.ema is not None:
            save_ema(w.ema, d)
        if final:
            with gathered(w.engine, w.cfg):
                if w.rank == 0:
                    save_final(d, w)

    return write


def restore_extra(rank: int, world: int, data_pos: dict, ema):
    """-> read(checkpoint dir): this rank's data position (every rank reads all the saved ones: with another world
    size they all move to the next epoch no old rank had started, mtn.data.shards.resume_position) and the EMA."""
    from mtn.data.shards import resume_position

    def read(d: Path) -> None:
        saved = {int(f.stem.removeprefix("data_rank")): json.loads(f.read_text()) for f in d.glob("data_rank*.json")}
        pos, note = resume_position(saved, rank, world)
        data_pos.update(pos)
        if note and rank == 0:
            print(note, flush=True)
        if ema is not None and (d / "ema.safetensors").is_file():
            load_ema(ema, d)

    return read


# ----------------------------------------------------------------------------------------------- loop
def train_loop_per_worker(config: dict):
    from ray.experimental.tqdm_ray import tqdm

    w = setup_worker(config)
    cfg, state = w.cfg, w.state
    # never raises: MLflow may be down; SIGTERM to the driver -> checkpoint and return (mtn/train/preemption.py)
    tracker = RunTracker(cfg, state["mlflow_run_id"], job="finetune_unet") if w.rank == 0 else None
    stop = StopSignal(cfg.name, w.engine.device)
    bar = tqdm(total=cfg.max_steps, desc="finetune_unet") if tracker else None
    if bar:
        bar.update(state["step"])
    w.engine.module.train()
    t_start, images = time.perf_counter(), 0
    for step in range(state["step"] + 1, cfg.max_steps + 1):
        loss, rows = train_step(w, step)
        images += rows
        state["step"] = step
        metrics = step_metrics(w, step, loss, images, time.perf_counter() - t_start)
        last = step == cfg.max_steps
        if step % cfg.val_every == 0 or last:
            validate(w, step, tracker)
        if tracker:
            if step % cfg.log_every == 0 or last:
                tracker.log_metrics(metrics, step)
                state["mlflow_run_id"] = tracker.run_id
                state["history"].append({k: v for k, v in metrics.items() if k.startswith(("train/", "perf/"))})
            bar.update(1)
            bar.set_description(f"finetune_unet loss {loss:.4f}")
        if last:
            state["final_metrics"] = {k: v for k, v in metrics.items() if k != "step"}
            if bar:  # before the final report: the driver prints its summary once the checkpoint is in
                bar.close()
                bar = None
            report(w.engine, state, metrics, w.rank, checkpoint_extra(w, final=True))
        elif stop.check() or step % cfg.checkpoint_every == 0:  # every rank calls check() at every step
            report(w.engine, state, metrics, w.rank, checkpoint_extra(w))
            if stop.stopping:
                if w.rank == 0:
                    print(f"stop requested: checkpoint saved at step {step}", flush=True)
                break
    if bar:
        bar.close()
    if tracker:  # the run stays RUNNING for the driver's upload, unless preempted
        tracker.close("KILLED" if stop.stopping else None)


# ----------------------------------------------------------------------------------------------- driver
def prepare(cfg: FinetuneConfig) -> FinetuneConfig:
    """Absolute local paths (workers run elsewhere), MLflow default, toy shards when asked; fail fast on data."""
    cfg.resolve_paths()  # output_dir, storage_path, train_shards (folder, glob or list file), precomputed
    if "://" not in cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if cfg.precomputed:
        from mtn.data.latents import check_latents_manifest, read_latents_manifest

        manifest = read_latents_manifest(cfg.precomputed)
        check_latents_manifest(manifest, cfg.pipeline, cfg.translator, cfg.resolution,
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
    args = job_parser(__doc__, DEFAULT_CONFIG).parse_args(argv)
    return exit_code(lambda: drive(args.config, args.overrides))


def drive(config, overrides) -> int:
    cfg = prepare(load_config(config, overrides, cls=FinetuneConfig))
    result = fit_or_preempt(train_loop_per_worker, cfg)
    # the final checkpoint is saved and published before anything goes to MLflow; a failed publish (the storage
    # failed mid-way) is an MTNError: the previous output stays, a re-run publishes
    summary = publish(cfg, result)
    if summary:
        model = {"pipeline": summary["pipeline"], **({"translator": summary["translator"]} if cfg.translator else {})}
        upload_outputs(cfg.mlflow_tracking_uri, summary["mlflow_run_id"], {}, model, cfg.register_model,
                       experiment=cfg.mlflow_experiment, run_name=cfg.name)
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
