"""Pieces both Ray Train jobs share: checkpoint/report through Ray Train, resume, LR schedules, the trainer.

Checkpoints: every rank writes its DeepSpeed shard (and any per-rank files) into one temporary folder and calls
`ray.train.report(checkpoint=...)`; Ray merges the ranks' folders under `storage_path` (local, NFS or s3://).
Rank 0 adds the loop state (`train_state.json`). `load_checkpoint` is the resume path, after a worker failure
(`FailureConfig(max_failures)`) or a re-run with the same `name` + `storage_path`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

STATE_FILE = "train_state.json"
DS_TAG = "deepspeed"


def load_checkpoint(engine, default: dict, extra: Callable[[Path], None] | None = None) -> dict:
    """Restore the engine (and `extra(dir)`, e.g. EMA weights or data positions) from Ray's latest checkpoint;
    -> the saved loop state, or `default` on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return default
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG)
        if extra is not None:
            extra(Path(d))
        return {**default, **json.loads((Path(d) / STATE_FILE).read_text())}


def report(engine, state: dict, metrics: dict, rank: int, extra: Callable[[Path], None] | None = None) -> None:
    """Checkpoint every rank's DeepSpeed shard + `extra(dir)` + rank 0's loop state, and hand it to Ray Train."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        if engine is not None:
            engine.save_checkpoint(tmp, tag=DS_TAG)
        if extra is not None:
            extra(Path(tmp))
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def copy_artifacts(checkpoint_dir: Path, output_dir: str, names: tuple[str, ...]) -> None:
    """Copy the named files/folders of a (final) checkpoint into output_dir, local or s3://; missing ones are
    skipped (a baseline has no loss curve, a native-encoder finetune no translator)."""
    import shutil

    import fsspec

    fs, root = fsspec.core.url_to_fs(output_dir)
    for name in names:
        src = checkpoint_dir / name
        if not src.exists():
            continue
        if "://" in output_dir:
            fs.put(str(src), f"{root}/{name}", recursive=True)
        elif src.is_dir():
            shutil.copytree(src, Path(root) / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, Path(root) / name)


def final_state(result, output_dir: str, required: str, names: tuple[str, ...]) -> dict | None:
    """A finished run's final checkpoint: copy `names` out of it into output_dir and return its train state;
    None (the reason printed) when there is no checkpoint or it lacks `required` (training stopped early)."""
    import sys

    if result.checkpoint is None:
        print("error: training produced no checkpoint", file=sys.stderr)
        return None
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / required).is_dir():
            print(f"error: the last checkpoint ({result.checkpoint.path}) holds no {required}; was max_steps reached?",
                  file=sys.stderr)
            return None
        copy_artifacts(d, output_dir, names)
        return json.loads((d / STATE_FILE).read_text())


def print_summary(job: str, summary: dict, metrics: dict, footer: tuple[str, ...] = ()) -> None:
    lines = ["", f"== {job} finished =="] + [f"  {k:28s} {v}" for k, v in summary.items()]
    lines += [f"  {k:28s} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)] + list(footer)
    # sys.stdout, not print: Ray's progress-bar manager patches print() to redraw bars around each line
    import sys

    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def lr_factor(schedule: str, warmup_steps: int, max_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """Multiplier of each param group's own lr at a step: linear warmup, then constant or cosine to min_ratio."""
    warmup = max(warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def fit(train_loop, cfg, env: dict | None = None, callbacks: list | None = None):
    """Run `train_loop(cfg.to_dict())` on cfg.num_workers Ray Train workers; -> the Ray Train Result.
    cfg needs: name, storage_path, num_workers, use_gpu, cpus_per_worker, gpus_per_worker, max_failures,
    num_checkpoints_to_keep, ray_address."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = {**({"DS_ACCELERATOR": "cpu"} if not cfg.use_gpu else {}), **(env or {})}
    started_here = not ray.is_initialized()
    if started_here:
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker)}
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **local)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
                             callbacks=callbacks),
    )
    result = trainer.fit()
    if started_here:
        ray.shutdown()  # stops the workers' progress-bar forwarding before the summary prints
    return result
