"""Pieces both Ray Train jobs share: checkpoint/report through Ray Train, resume, publish, LR schedules, the trainer.

Checkpoints: every rank writes its DeepSpeed shard (and any per-rank files) into one temporary folder under
`checkpoint_staging_dir` (default: the system temp dir) and calls `ray.train.report(checkpoint=...)`; Ray merges the
ranks' folders under `storage_path` (local, NFS or s3://). Rank 0 adds the loop state (`train_state.json`), which
records the run's config. `load_checkpoint` is the resume path, after a worker failure (`FailureConfig(max_failures)`)
or a re-run with the same `name` + `storage_path`; before that, `fit` checks the config against the checkpoint's
(mtn/train/resume.py). `final_state` publishes the final checkpoint's artifacts to output_dir (mtn/publish.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mtn.errors import MTNError

STATE_FILE = "train_state.json"
DS_TAG = "deepspeed"


def load_checkpoint(engine, default: dict, extra: Callable[[Path], None] | None = None,
                    config: dict | None = None) -> dict:
    """Restore the engine (and `extra(dir)`, e.g. EMA weights or data positions) from Ray's latest checkpoint;
    -> the saved loop state, or `default` on a fresh start. `config` (the driver's config dict) goes into the state,
    so that every later checkpoint records the config it was made with (mtn/train/resume.py compares it)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    recorded = {"config": config} if config is not None else {}
    if ckpt is None:
        return {**default, **recorded}
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag=DS_TAG)
        if extra is not None:
            extra(Path(d))
        return {**default, **json.loads((Path(d) / STATE_FILE).read_text()), **recorded}


def report(engine, state: dict, metrics: dict, rank: int, extra: Callable[[Path], None] | None = None) -> None:
    """Checkpoint every rank's DeepSpeed shard + `extra(dir)` + rank 0's loop state, and hand it to Ray Train."""
    import ray.train

    with staged_checkpoint(engine, state, rank, extra) as tmp:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@contextlib.contextmanager
def staged_checkpoint(engine, state: dict, rank: int, extra: Callable[[Path], None] | None = None):
    """A folder in the staging dir (state["config"]["checkpoint_staging_dir"], else the system temp dir) holding this
    rank's part of a checkpoint; deleted on exit. Before writing, the free space there is checked against what this
    node's ranks (which stage at the same time, often into one shared /tmp) are about to write. Each rank's size is
    remembered in state["checkpoint_bytes"] for the next check. A folder this rank of this run left behind when its
    process was killed mid-checkpoint (no cleanup ran) is deleted first: it would eat the space."""
    config = state.get("config") or {}
    staging = Path(config.get("checkpoint_staging_dir") or tempfile.gettempdir())
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MTNError(f"checkpoint_staging_dir {staging} cannot be created: {e}") from None
    run = re.sub(r"[^\w.-]", "_", config.get("name", "run"))
    prefix = f"mtn-ckpt-{run}-rank{rank}-"
    for leftover in staging.glob(f"{prefix}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    sizes = state.setdefault("checkpoint_bytes", {})
    own = int(sizes.get(str(rank)) or estimate_checkpoint_bytes(engine, rank))
    free = shutil.disk_usage(staging).free  # before the all-gather: no rank of this checkpoint has written yet
    need, ranks = node_need(staging, own, sizes)
    check_free_space(staging, free, need, ranks)
    with tempfile.TemporaryDirectory(dir=staging, prefix=prefix) as tmp:
        if engine is not None:
            engine.save_checkpoint(tmp, tag=DS_TAG)
        if extra is not None:
            extra(Path(tmp))
        sizes[str(rank)] = folder_bytes(Path(tmp))
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        yield tmp


def estimate_checkpoint_bytes(engine, rank: int) -> int:
    """Before a rank's first checkpoint: fp32 weights (4 B/param; on rank 0, or split over ranks under ZeRO-3) +
    the AdamW state (fp32 master + 2 moments, 12 B per trainable param; split over ranks under ZeRO >= 1, rank 0's
    under ZeRO-0). Extras (EMA weights, data positions) are not counted: later checks use measured sizes."""
    if engine is None:
        return 0
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    stage = engine.zero_optimization_stage()
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in engine.module.parameters()]
    total, trainable = sum(n for n, _ in numel), sum(n for n, g in numel if g)
    weights = 4 * total / world if stage == 3 else (4 * total if rank == 0 else 0)
    optimizer = 12 * trainable / world if stage >= 1 else (12 * trainable if rank == 0 else 0)
    return int(weights + optimizer)


def node_need(staging: Path, own: int, sizes: dict) -> tuple[int, int]:
    """-> (bytes, ranks) that the ranks staging into this same folder on this host will write, from every rank's
    `own` (one all-gather; the sizes learnt go into `sizes`, so rank 0's saved state knows them after a resume)."""
    import socket

    import torch.distributed as dist

    me = (socket.gethostname(), str(staging.resolve()))
    if not (dist.is_available() and dist.is_initialized()):
        return own, 1
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (*me, own))
    sizes.update({str(r): b for r, (_, _, b) in enumerate(rows) if b})
    mine = [b for host, path, b in rows if (host, path) == me]
    return sum(mine), len(mine)


def check_free_space(staging: Path, free: int, need: int, ranks: int = 1) -> None:
    if need > free:
        gb = 1024**3
        raise MTNError(f"checkpoint staging: {staging} has {free / gb:.2f} GiB free but {ranks} rank(s) of this node "
                       f"need about {need / gb:.2f} GiB to stage a checkpoint there; set checkpoint_staging_dir to a "
                       "folder on a larger disk (on Kubernetes: a bigger emptyDir/volume for it)")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def final_state(result, output_dir: str, required: str, names: tuple[str, ...]) -> dict | None:
    """A finished run's final checkpoint: publish `names` out of it to output_dir (mtn/publish.py: a new version,
    switched to at the end) -> its train state + "published": {name: URI to read it at}; None (the reason printed)
    when there is no checkpoint or it lacks `required` (training stopped early). A failed publish raises MTNError."""
    import sys

    from mtn.publish import publish

    if result.checkpoint is None:
        print("error: training produced no checkpoint", file=sys.stderr)
        return None
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / required).is_dir():
            print(f"error: the last checkpoint ({result.checkpoint.path}) holds no {required}; was max_steps reached?",
                  file=sys.stderr)
            return None
        state = json.loads((d / STATE_FILE).read_text())
        meta = {"step": state["step"], "checkpoint": result.checkpoint.path}
        return {**state, "published": publish(d, output_dir, names, meta)}


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


def fit(train_loop, cfg, env: dict | None = None, callbacks: list | None = None,
        on_ray_ready: Callable[[], None] | None = None):
    """Run `train_loop(cfg.to_dict())` on cfg.num_workers Ray Train workers; -> the Ray Train Result.
    cfg needs: name, storage_path, num_workers, use_gpu, cpus_per_worker, gpus_per_worker, max_failures,
    num_checkpoints_to_keep, ray_address, resume, max_steps. First, before Ray starts, the run's latest checkpoint
    is checked against cfg (mtn/train/resume.py). An MTNError raised in a worker comes back as MTNError (one line)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mtn.train.resume import check_resume

    check_resume(cfg)
    env = {**({"DS_ACCELERATOR": "cpu"} if not cfg.use_gpu else {}), **(env or {})}
    started_here = not ray.is_initialized()
    if started_here:
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
        local = {} if address else {"num_cpus": max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker)}
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, **local)
    if on_ray_ready is not None:  # e.g. mtn.train.preemption re-installs its SIGTERM handler over ray.init's
        on_ray_ready()
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
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError: a worker's MTNError is a user error, said in one line
        message = worker_user_error(e)
        if message is None:
            raise
        raise MTNError(f"a training worker stopped: {message}") from None
    finally:
        if started_here:
            ray.shutdown()  # stops the workers' progress-bar forwarding before the summary prints
    return result


def worker_user_error(error: BaseException) -> str | None:
    """The message of an MTNError behind a Ray Train failure (WorkerGroupError.worker_failures hold the workers'
    exceptions, wrapped with their traceback text), or None."""
    failures = list(getattr(error, "worker_failures", {}).values())
    failures += [getattr(error, "controller_failure", None)]
    for failure in failures:
        seen = 0
        while failure is not None and seen < 10:
            failure = getattr(failure, "_base_exc", failure)  # ray's UserExceptionWithTraceback
            if isinstance(failure, MTNError):
                return str(failure)
            failure, seen = failure.__cause__ or failure.__context__, seen + 1
    return None
