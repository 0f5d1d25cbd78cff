"""Resume only what matches: a re-run with the same `name` + `storage_path` continues the run's latest checkpoint
only when its config matches the one recorded in that checkpoint.

Every checkpoint's train_state.json records the config the run was started with (`config`, see
mtn.train.checkpoint.load_checkpoint). Before any worker starts, the driver reads the checkpoint Ray Train would resume
from (`<storage_path>/<name>/checkpoint_manager_snapshot.json` -> its latest checkpoint, local or s3://) and
compares. `resume` (one config field) says what a difference does:

    auto   (default) resume when nothing but the RESUMABLE keys changed; otherwise refuse, naming the changed keys
    never  start at step 0: the run's checkpoints under <storage_path>/<name> are deleted first
    force  resume although keys changed (the new values apply from the checkpoint's step on); you answer for it

A checkpoint past the new max_steps is refused in auto and force (training cannot go back), and so is another
num_workers under ZeRO >= 1 (DeepSpeed cannot re-partition the optimizer state for another world size).
"""

from __future__ import annotations

import json

from mtn.errors import MTNError
from mtn.publish import filesystem

RESUME_MODES = ("auto", "never", "force")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints (ray 2.60)
STATE_FILE = "train_state.json"

# The keys that may differ between a checkpoint and the run resuming it, grouped by why: none of them changes what
# is trained. Everything else (model, data, losses, optimiser, precision, seed, num_workers, ...) must match.
RESUMABLE_BECAUSE = {
    "it extends the run (a cosine schedule is re-stretched to the new end); below the checkpoint: refused":
        ("max_steps",),
    "how often it logs, validates and checkpoints, and how many checkpoints it keeps":
        ("log_every", "val_every", "checkpoint_every", "num_checkpoints_to_keep"),
    "where and on what it runs (the data order does not depend on the DataLoader processes)":
        ("ray_address", "cpus_per_worker", "gpus_per_worker", "worker_resources", "placement_strategy",
         "loader_workers", "checkpoint_staging_dir"),
    "how it handles failures and preemption": ("max_failures", "stop_timeout_s", "resume"),
    "the run's name and where its checkpoints and outputs go": ("name", "storage_path", "output_dir"),
    "tracking, and what happens after training":
        ("mlflow_tracking_uri", "mlflow_experiment", "mlflow_parent_run_id", "register_model", "register_alias"),
    "the logged validation grid only": ("val_prompts", "val_steps", "val_guidance_scale", "val_seed"),
    "knobs of the other jobs sharing these configs (feature extraction, latent precomputation)":
        ("extract_workers", "extract_batch_size", "extract_shard_rows", "extract_gpus_per_worker",
         "precompute_workers", "precompute_gpus_per_worker"),
}
RESUMABLE = {key: why for why, keys in RESUMABLE_BECAUSE.items() for key in keys}


def changed_keys(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (checkpoint's value, new value)} for every key outside RESUMABLE that differs. Keys only one side
    has (a field the code added or removed since the checkpoint) are not compared."""
    keys = (set(saved) & set(current)) - set(RESUMABLE)
    return {k: (saved[k], current[k]) for k in sorted(keys) if saved[k] != current[k]}


def latest_checkpoint_state(storage_path: str, name: str) -> tuple[str, dict] | None:
    """(checkpoint path, its train_state.json) of the checkpoint Ray Train resumes `name` from; None if none."""
    fs, root = filesystem(storage_path)
    run = f"{root.rstrip('/')}/{name}"
    try:
        snapshot = json.loads(fs.cat_file(f"{run}/{SNAPSHOT}"))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    path = f"{run}/{latest['checkpoint_dir_name']}"
    try:
        state = json.loads(fs.cat_file(f"{path}/{STATE_FILE}"))
    except FileNotFoundError:
        state = {}
    shown = path if "://" not in storage_path else f"{storage_path.split('://')[0]}://{path}"
    return shown, state


def check_resume(cfg) -> None:
    """The driver's check before workers start: raise MTNError (one line) when the run's latest checkpoint was made
    with another config and cfg.resume is auto; with never, delete the run's checkpoints; print what happens."""
    found = latest_checkpoint_state(cfg.storage_path, cfg.name)
    if found is None:
        return
    path, state = found
    step = state.get("step", 0)
    where = f"run {cfg.name!r} under {cfg.storage_path}"
    if cfg.resume == "never":
        delete_run(cfg.storage_path, cfg.name)
        print(f"resume=never: deleted the checkpoints of {where} (last at step {step}); starting at step 0")
        return
    if step > cfg.max_steps:
        raise MTNError(f"{where} has a checkpoint at step {step}, past max_steps={cfg.max_steps}: raise max_steps, "
                       "give another name=..., or set resume=never to start over")
    if "config" not in state:  # written before checkpoints recorded their config
        print(f"note: the checkpoint of {where} records no config; resuming at step {step} without checking it")
        return
    changes = changed_keys(state["config"], cfg.to_dict())
    if not changes:
        return
    listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
    zero = min(state["config"].get("zero_stage", 0), getattr(cfg, "zero_stage", 0))
    if "num_workers" in changes and zero >= 1:  # DeepSpeed's load_checkpoint raises ZeRORuntimeException (0.19)
        was = changes["num_workers"][0]
        raise MTNError(f"{where} has a checkpoint (step {step}) whose ZeRO-{zero} optimizer state is partitioned over "
                       f"num_workers={was}: DeepSpeed cannot load it on {cfg.num_workers} workers, even with "
                       f"resume=force. Use num_workers={was}, another name=..., or resume=never (start over)")
    if cfg.resume == "force":
        print(f"resume=force: continuing {where} from step {step} with changed keys: {listed}")
        return
    split = "; with another num_workers, finetune_unet skips the rest of the epoch and continues at the next one" \
        if "num_workers" in changes else ""
    raise MTNError(f"{where} has a checkpoint (step {step}) made with another config: {listed}. Use the same "
                   "values, another name=..., resume=never (start over; deletes those checkpoints) or resume=force "
                   f"(continue with the new values{split})")


def remove_unregistered_checkpoints(storage_path: str, name: str) -> list[str]:
    """Delete the run's checkpoint folders Ray Train never registered -> their names. A checkpoint is registered
    once every rank has reported it; a rank lost while reporting (its node died) leaves the others' parts in a
    folder that no resume ever reads. Call it only while no worker of the run is running (before fit, after it)."""
    fs, root = filesystem(storage_path)
    run = f"{root.rstrip('/')}/{name}"
    try:
        snapshot = json.loads(fs.cat_file(f"{run}/{SNAPSHOT}"))
    except FileNotFoundError:
        return []  # nothing registered yet (a first run): nothing known to be an orphan
    if "checkpoint_results" not in snapshot:  # another Ray's snapshot layout: never guess what is registered
        return []
    registered = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    latest = snapshot.get("latest_checkpoint_result") or {}
    registered.add(latest.get("checkpoint_dir_name"))
    orphans = [p for p in fs.ls(run, detail=False)
               if p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_") and fs.isdir(p)
               and p.rstrip("/").rsplit("/", 1)[-1] not in registered]
    for path in orphans:
        fs.rm(path, recursive=True)
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in orphans]


def delete_run(storage_path: str, name: str) -> None:
    fs, root = filesystem(storage_path)
    run = f"{root.rstrip('/')}/{name}"
    if fs.exists(run):
        fs.rm(run, recursive=True)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
