"""Train a Model Translation Network on Ray Train + DeepSpeed.

    python jobs/train_mtn.py                                    # jobs/configs/local.yaml: tiny, offline, CPU
    python jobs/train_mtn.py --config jobs/configs/multi30k.yaml source_lang=de max_steps=500
    ray job submit --working-dir . -- python jobs/train_mtn.py --config jobs/configs/xlmr_sd14.yaml

Reads text (monolingual or parallel), runs the frozen source and target encoders on each batch, trains the
MTN (+ token discriminator when loss_adv > 0), validates every `val_every` steps (token MSE, pooled cosine,
R@1/R@5), checkpoints through `ray.train.report` (resumed after worker failures or when re-run with the same
`name` and `storage_path`), logs to MLflow on rank 0, and writes the translator to `{output_dir}/translator`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from mtn.config import REPO_ROOT, TrainConfig, load_config
from mtn.data import load_pairs, split_train_val
from mtn.encoders import load_text_encoder
from mtn.errors import MTNError
from mtn.losses import mtn_losses
from mtn.metrics import alignment_metrics
from mtn.model import ModelTranslationNetwork, TokenDiscriminator
from mtn.tracking import MLflowTracker, save_loss_curve

DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "local.yaml"
STATE_FILE = "train_state.json"
DS_TAG = "deepspeed"


class MTNTrainModule(torch.nn.Module):
    """MTN + discriminator in one module, so that one DeepSpeed engine (one optimizer) trains both."""

    def __init__(self, mtn: ModelTranslationNetwork, disc: TokenDiscriminator, weights: dict, mse_on_mask: bool):
        super().__init__()
        self.mtn, self.disc, self.weights, self.mse_on_mask = mtn, disc, weights, mse_on_mask

    def forward(self, source, source_mask, target, target_mask):
        return mtn_losses(self.mtn, self.disc, source, source_mask, target, target_mask, self.weights,
                          self.mse_on_mask)


# ----------------------------------------------------------------------------------------------- setup
def setup_encoders(cfg: TrainConfig, device):
    kw = dict(dtype=cfg.encoder_dtype, device=device)
    source = load_text_encoder(cfg.source_encoder, cfg.source_max_length, cfg.source_prefix,
                               cfg.source_subfolder, **kw)
    target = load_text_encoder(cfg.target_encoder, cfg.target_max_length, cfg.target_prefix,
                               cfg.target_subfolder, **kw)
    return source, target


def setup_data(cfg: TrainConfig):
    pairs = load_pairs(cfg.source_file, cfg.target_file, cfg.corpus)
    if cfg.val_source_file:
        train, val = pairs, load_pairs(cfg.val_source_file, cfg.val_target_file)[: cfg.max_val_samples]
    else:
        train, val = split_train_val(pairs, cfg.val_fraction, cfg.seed, cfg.max_val_samples)
    return train[: cfg.max_train_samples] if cfg.max_train_samples else train, val


def build_mtn(cfg: TrainConfig, source_dim: int, target_dim: int) -> ModelTranslationNetwork:
    dims = dict(source_dim=source_dim, target_dim=target_dim, source_len=cfg.source_max_length,
                target_len=cfg.target_max_length, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                with_decoder=bool(cfg.loss_rec or cfg.loss_cycle))
    if cfg.num_modules is not None:
        return ModelTranslationNetwork(num_modules=cfg.num_modules, **dims)
    return ModelTranslationNetwork.from_named_size(cfg.mtn_size, **dims)


def deepspeed_config(cfg: TrainConfig, micro_batch: int) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        # torch's AdamW: no cpu_adam build (~50 s) unless offloading, where DeepSpeed may still prefer it
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True}},
        "zero_force_ds_cpu_optimizer": False,
        "scheduler": lr_scheduler(cfg),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "steps_per_print": 10**9,
    }


def lr_scheduler(cfg: TrainConfig) -> dict:
    """Linear warmup, then constant or cosine decay to 1% of lr at max_steps (DeepSpeed's own schedulers)."""
    warmup = max(cfg.warmup_steps, 1)
    if cfg.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": cfg.max_steps, "warmup_num_steps": warmup,
                                                     "warmup_type": "linear", "cos_min_ratio": 0.01}}
    return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                                           "warmup_num_steps": warmup, "warmup_type": "linear"}}


def setup_engine(cfg: TrainConfig, source_dim: int, target_dim: int, micro_batch: int):
    import deepspeed

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    mtn = build_mtn(cfg, source_dim, target_dim)
    disc = TokenDiscriminator(target_dim, cfg.disc_hidden_dim)
    module = MTNTrainModule(mtn, disc, cfg.loss_weights, cfg.mse_on_mask)
    params = [p for name, p in module.named_parameters() if cfg.loss_adv or not name.startswith("disc.")]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                      config=deepspeed_config(cfg, micro_batch))
    return engine


# ----------------------------------------------------------------------------------------------- data
def batches(train_pairs, per_worker: int, rank: int, world: int, seed: int, start_step: int):
    """Deterministic per-epoch shuffles; rank r takes every world-th sample. Resumes at `start_step`."""
    per_rank = len(train_pairs) // world
    steps_per_epoch = per_rank // per_worker
    if steps_per_epoch < 1:
        raise MTNError(f"{len(train_pairs)} training pairs are fewer than one global batch "
                       f"({per_worker * world}); lower batch_size or add data")
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[rank::world][:per_rank].tolist()
        for i in range(offset * per_worker, steps_per_epoch * per_worker, per_worker):
            yield [train_pairs[j] for j in mine[i:i + per_worker]]
            step += 1


@torch.no_grad()
def encode_pairs(source, target, pairs, batch_size: int = 64):
    out = [[], [], [], []]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        feats = (*source([s for s, _ in chunk], zero_pad=True), *target([t for _, t in chunk], zero_pad=True))
        for lst, t in zip(out, feats, strict=False):  # metrics only read real target tokens, so zero_pad is exact here
            lst.append(t.cpu())
    return [torch.cat(x) for x in out]  # src [N,S_s,d_s], src_mask [N,S_s], tgt [N,S_t,d_t], tgt_mask [N,S_t]


@torch.no_grad()
def validate(engine, val_feats, dtype, batch_size: int = 128) -> dict:
    """Every rank runs the whole (small) val set: under ZeRO-3 the forward is collective."""
    engine.module.eval()
    src, src_m, tgt, tgt_m = val_feats
    dev = engine.device
    preds = [engine.module.mtn.encode(src[i:i + batch_size].to(dev, dtype), src_m[i:i + batch_size].to(dev)).float().cpu()
             for i in range(0, len(src), batch_size)]
    engine.module.train()
    return {f"val/{k}": v for k, v in alignment_metrics(torch.cat(preds), tgt, tgt_m).items()}


# ----------------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(engine) -> dict:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"step": 0, "history": [], "mlflow_run_id": None}
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG)
        return json.loads((Path(d) / STATE_FILE).read_text())


def export_translator(engine, source, target, cfg: TrainConfig, state: dict, out_dir: Path, rank: int):
    """Gather the (possibly ZeRO-3 sharded) MTN weights and, on rank 0, save the translator folder."""
    import deepspeed

    from mtn.translator import Translator

    mtn = engine.module.mtn
    with deepspeed.zero.GatheredParameters(list(mtn.parameters()), modifier_rank=None):
        if rank == 0:
            clean = ModelTranslationNetwork.from_config(mtn.config)
            clean.load_state_dict({k: v.detach().float().cpu() for k, v in mtn.state_dict().items()})
            training = {"config": cfg.to_dict(), "steps": state["step"], "final_metrics": state.get("final_metrics")}
            Translator(source, clean, {"target_encoder": target.spec()}).save(
                out_dir, bundle_source_encoder=cfg.bundle_source_encoder, training=training)


def write_final_artifacts(tmp: Path, engine, source, target, cfg, state, metrics, rank, tracker):
    """Into the final checkpoint: translator/, loss_curve.png, metrics.json; and the same to MLflow."""
    export_translator(engine, source, target, cfg, state, tmp / "translator", rank)
    if rank == 0:
        save_loss_curve(state["history"], tmp / "loss_curve.png")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracker.finish(tmp / "translator", tmp / "loss_curve.png", metrics)


def report(engine, state: dict, metrics: dict, rank: int, final_extra=None):
    """Checkpoint every rank's DeepSpeed shard + the loop state, and hand it to Ray Train."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG)
        if final_extra is not None:
            final_extra(Path(tmp))
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


# ----------------------------------------------------------------------------------------------- loop
def train_loop_per_worker(config: dict):
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    source, target = setup_encoders(cfg, device)
    train_pairs, val_pairs = setup_data(cfg)
    per_worker = cfg.batch_size // world
    engine = setup_engine(cfg, source.hidden_size, target.hidden_size, per_worker)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    state = load_checkpoint(engine)
    if rank == 0 and state["step"]:
        print(f"resuming from the checkpoint at step {state['step']} (same name + storage_path); "
              f"give another name=... for a fresh run")
    tracker = MLflowTracker(cfg, state["mlflow_run_id"]) if rank == 0 else None
    if tracker:
        state["mlflow_run_id"] = tracker.run_id
    val_feats = encode_pairs(source, target, val_pairs) if val_pairs else None

    start = state["step"]
    bar = tqdm(total=cfg.max_steps, desc="train_mtn") if rank == 0 else None
    if bar:
        bar.update(start)  # tqdm_ray has no `initial`
    metrics = {}
    for step, batch in enumerate(batches(train_pairs, per_worker, rank, world, cfg.seed, start), start=start + 1):
        if step > cfg.max_steps:
            break
        with torch.no_grad():
            # the MTN masks padded source positions, so the source LM stops at the batch's longest caption
            src, src_m = source([s for s, _ in batch], zero_pad=True)  # [b, S_s, d_s], [b, S_s]
            tgt, tgt_m = target([t for _, t in batch], zero_pad=cfg.mse_on_mask)  # [b, S_t, d_t], [b, S_t]
        total, terms = engine(src.to(dtype), src_m, tgt.to(dtype), tgt_m)
        engine.backward(total)
        engine.step()
        metrics = {"step": step, "train/loss": total.item(), **{f"train/{k}": float(v) for k, v in terms.items()}}
        if val_feats is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
            metrics.update(validate(engine, val_feats, dtype))
        state["step"] = step
        if tracker:
            if step % cfg.log_every == 0 or any(k.startswith("val/") for k in metrics) or step == start + 1:
                state["history"].append(metrics)
                tracker.log_metrics(metrics, step)
            bar.update(1)
            bar.set_description(f"train_mtn loss {metrics['train/loss']:.4f}")
        if step == cfg.max_steps:
            if bar:
                bar.close()  # before the final report, so the driver hears of it before Ray shuts down
                bar = None
            state["final_metrics"] = {k: v for k, v in metrics.items() if k.startswith("val/")}

            report(engine, state, metrics, rank, functools.partial(
                write_final_artifacts, engine=engine, source=source, target=target, cfg=cfg, state=state,
                metrics=metrics, rank=rank, tracker=tracker))
        elif step % cfg.checkpoint_every == 0:
            report(engine, state, metrics, rank)
    if bar:
        bar.close()
    if tracker and tracker.mlflow.active_run():  # resumed at or past max_steps: nothing ran, close the run again
        tracker.mlflow.end_run()


# ----------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=10")
    args = p.parse_args(argv)
    try:
        cfg = prepare_config(args.config, args.overrides)
        load_pairs(cfg.source_file, cfg.target_file, cfg.corpus)  # fail fast on bad data, before Ray starts
        if cfg.val_source_file:
            load_pairs(cfg.val_source_file, cfg.val_target_file)
        result = run(cfg)
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result else 1


def prepare_config(path, overrides) -> TrainConfig:
    cfg = load_config(path, overrides)
    if "://" not in cfg.output_dir:
        cfg.output_dir = str(Path(cfg.output_dir).resolve())
    if "://" not in cfg.storage_path:
        cfg.storage_path = str(Path(cfg.storage_path).resolve())
    cfg.mlflow_tracking_uri = (cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                               or f"sqlite:///{cfg.output_dir}/mlflow.db")
    data = [f for f in (cfg.corpus, cfg.source_file, cfg.target_file, cfg.val_source_file) if f]
    if any(f.startswith(cfg.data_root) for f in data) and "://" not in cfg.data_root \
            and not Path(cfg.data_root).is_dir():
        raise MTNError(f"data folder not found: {cfg.data_root} (set $MTN_SHARED_DATA or data_root=...)")
    for name in ("source_encoder", "target_encoder"):  # check encoders exist before starting workers
        ref = getattr(cfg, name)
        if ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists():
            hint = (" (run: python ../shared/tools/real-encoders/materialize.py, or set $MTN_REAL_ENCODERS)"
                    if "real-encoders" in ref or "mtn-real-encoders" in ref else "")
            raise MTNError(f"{name} not found: {ref}{hint}")
    return cfg


def run(cfg: TrainConfig):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if "://" not in cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    env = {"DS_ACCELERATOR": "cpu"} if not cfg.use_gpu else {}
    started_here = not ray.is_initialized()
    if started_here:
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker)}
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **local)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep)),
    )
    result = trainer.fit()
    if started_here:
        ray.shutdown()  # stops the workers' progress-bar forwarding before the summary prints
    return publish(cfg, result)


def publish(cfg: TrainConfig, result) -> dict | None:
    """Copy the translator, loss curve and metrics out of the final checkpoint into output_dir; say where."""
    import fsspec

    if result.checkpoint is None:
        print("error: training produced no checkpoint", file=sys.stderr)
        return None
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / "translator").is_dir():
            print(f"error: the last checkpoint ({result.checkpoint.path}) holds no translator; "
                  f"was max_steps reached?", file=sys.stderr)
            return None
        state = json.loads((d / STATE_FILE).read_text())
        fs, root = fsspec.core.url_to_fs(cfg.output_dir)
        for name in ("translator", "loss_curve.png", "metrics.json"):
            if "://" in cfg.output_dir:
                fs.put(str(d / name), f"{root}/{name}", recursive=True)
            elif (d / name).is_dir():
                shutil.copytree(d / name, Path(root) / name, dirs_exist_ok=True)
            else:
                shutil.copy2(d / name, Path(root) / name)
    metrics = json.loads(Path(cfg.output_dir, "metrics.json").read_text()) if "://" not in cfg.output_dir else {}
    summary = {"translator": f"{cfg.output_dir}/translator", "loss_curve": f"{cfg.output_dir}/loss_curve.png",
               "metrics": f"{cfg.output_dir}/metrics.json", "checkpoint": result.checkpoint.path,
               "mlflow_tracking_uri": cfg.mlflow_tracking_uri, "mlflow_experiment": cfg.mlflow_experiment,
               "mlflow_run_id": state.get("mlflow_run_id"), "steps": state["step"]}
    lines = ["", "== train_mtn finished =="] + [f"  {k:20s} {v}" for k, v in summary.items()]
    lines += [f"  {k:20s} {v:.4f}" for k, v in metrics.items() if k.startswith("val/")]
    lines += [f"  browse runs with:    mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri}", ""]
    # sys.stdout, not print: Ray's progress-bar manager patches print() to redraw bars around each line
    sys.stdout.write("\n".join(lines))
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    sys.exit(main())
