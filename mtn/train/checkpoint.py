"""Checkpoints of both Ray Train jobs: report through Ray Train, staging, restore, and the final checkpoint's publish.

Checkpoints: every rank writes its DeepSpeed shard (and any per-rank files) into one temporary folder under
`checkpoint_staging_dir` (default: the system temp dir) and calls `ray.train.report(checkpoint=...)`; Ray merges the
ranks' folders under `storage_path` (local, NFS or s3://). Rank 0 adds the loop state (`train_state.json`), which
records the run's config. `load_checkpoint` is the resume path, after a worker failure (`FailureConfig(max_failures)`)
or a re-run with the same `name` + `storage_path`; before that, `fit` (mtn/train/fit.py) checks the config against
the checkpoint's (mtn/train/resume.py). `checkpoint_or_stop` is the loops' periodic or preemption checkpoint.
`final_state` publishes the final checkpoint's artifacts to output_dir (mtn/publish.py).
"""

from __future__ import annotations

import contextlib
import json
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


def checkpoint_or_stop(engine, state: dict, metrics: dict, rank: int, stop, every: int,
                       extra: Callable[[Path], None] | None = None) -> bool:
    """The loop's checkpoint at state["step"]: every `every` steps, or now when a stop was requested (`stop`: a
    mtn.train.preemption.StopSignal; every rank calls this at every step, since its check is collective);
    -> True when the loop must end (a stop, checkpointed)."""
    if not (stop.check() or state["step"] % every == 0):
        return False
    report(engine, state, metrics, rank, extra)
    if stop.stopping and rank == 0:
        print(f"stop requested: checkpoint saved at step {state['step']}", flush=True)
    return stop.stopping


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
    for leftover in staging.glob(f"{prefix}*"):  # only a dead process's: another run of the same name may share it
        if not _pid_alive(leftover.name[len(prefix):].split("-")[0]):
            shutil.rmtree(leftover, ignore_errors=True)
    sizes = state.setdefault("checkpoint_bytes", {})
    own = int(sizes.get(str(rank)) or estimate_checkpoint_bytes(engine, rank))
    free = shutil.disk_usage(staging).free  # before the all-gather: no rank of this checkpoint has written yet
    need, ranks = node_need(staging, own, sizes)
    check_free_space(staging, free, need, ranks)
    with tempfile.TemporaryDirectory(dir=staging, prefix=f"{prefix}{os.getpid()}-") as tmp:
        if engine is not None:
            engine.save_checkpoint(tmp, tag=DS_TAG)
        if extra is not None:
            extra(Path(tmp))
        sizes[str(rank)] = folder_bytes(Path(tmp))
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
        yield tmp


def _pid_alive(text: str) -> bool:
    """Whether the process that staged a folder (its pid, from the folder name) still runs on this host."""
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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
