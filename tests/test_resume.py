"""Resume only what matches (mtn/train/resume.py), checkpoint staging with a free-space check, worker errors in one line
(mtn/train/checkpoint.py). No Ray here: the run folders are laid out as Ray Train 2.60 writes them (the job tests in
tests/test_train_job.py check the same against real runs)."""

import json
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from mtn.errors import MTNError
from mtn.finetune_config import FinetuneConfig
from mtn.train import checkpoint as distributed
from mtn.train import resume
from mtn.train_config import TrainConfig


def config(**kw) -> TrainConfig:
    return TrainConfig(corpus="generated:50", **kw)


def write_run(storage: str, name: str, state: dict) -> str:
    """A run folder holding one registered checkpoint, as Ray Train leaves it: the snapshot names the latest."""
    from mtn.publish import filesystem

    fs, root = filesystem(storage)
    ckpt = "checkpoint_2026-12-01_19-00-00.000000"
    fs.makedirs(f"{root}/{name}/{ckpt}", exist_ok=True)  # no-op on S3
    fs.pipe_file(f"{root}/{name}/{ckpt}/{resume.STATE_FILE}", json.dumps(state).encode())
    fs.pipe_file(f"{root}/{name}/{resume.SNAPSHOT}", json.dumps(
        {"ray_version": "2.60.0", "checkpoint_results": [{"checkpoint_dir_name": ckpt, "metrics": {}}],
         "latest_checkpoint_result": {"checkpoint_dir_name": ckpt, "metrics": {}}}).encode())
    return f"{storage}/{name}/{ckpt}"


@pytest.fixture
def run(tmp_path):
    """A checkpoint at step 3 of run 'r' made with the default config."""
    cfg = config(name="r", storage_path=str(tmp_path / "ray"), max_steps=3)
    write_run(cfg.storage_path, "r", {"step": 3, "config": cfg.to_dict()})
    return cfg


def test_same_config_or_only_resumable_keys_changed_resumes(run, capsys):
    resume.check_resume(run)
    changed = config(name="r", storage_path=run.storage_path, max_steps=10, log_every=1, val_every=2,
                     checkpoint_every=5, num_checkpoints_to_keep=1, max_failures=3, output_dir="/elsewhere",
                     mlflow_experiment="other", checkpoint_staging_dir="/scratch", extract_workers=7)
    resume.check_resume(changed)
    assert capsys.readouterr().out == ""


def test_changed_config_is_refused_naming_the_keys(run):
    changed = config(name="r", storage_path=run.storage_path, max_steps=5, loss_adv=0.5, hidden_dim=32,
                     num_workers=2, batch_size=32)
    with pytest.raises(MTNError) as e:
        resume.check_resume(changed)
    msg = str(e.value)
    assert "\n" not in msg and f"run 'r' under {run.storage_path} has a checkpoint (step 3)" in msg
    assert "hidden_dim None -> 32, loss_adv 0.0 -> 0.5, num_workers 1 -> 2" in msg
    assert "max_steps" not in msg and "resume=never" in msg and "resume=force" in msg


def test_force_resumes_with_the_new_values_and_never_deletes_the_run(run, capsys):
    changed = {"name": "r", "storage_path": run.storage_path, "max_steps": 5, "lr": 1e-3}
    resume.check_resume(config(**changed, resume="force"))
    assert "resume=force: continuing run 'r'" in capsys.readouterr().out
    assert (Path(run.storage_path) / "r").is_dir()
    resume.check_resume(config(**changed, resume="never"))
    assert "resume=never: deleted the checkpoints of run 'r'" in capsys.readouterr().out
    assert not (Path(run.storage_path) / "r").exists() and Path(run.storage_path).is_dir()
    resume.check_resume(config(**changed))  # nothing left to compare with: a fresh start


def test_checkpoint_past_max_steps_is_refused(run):
    with pytest.raises(MTNError, match=r"checkpoint at step 3, past max_steps=2"):
        resume.check_resume(config(name="r", storage_path=run.storage_path, max_steps=2, resume="force"))


def test_checkpoint_without_a_recorded_config_resumes_with_a_note(tmp_path, capsys):
    write_run(str(tmp_path), "old", {"step": 2})
    resume.check_resume(config(name="old", storage_path=str(tmp_path), lr=1.0))
    assert "records no config; resuming at step 2 without checking it" in capsys.readouterr().out


def test_finetune_config_on_s3_storage(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("ckpts")
    cfg = FinetuneConfig(name="ft", storage_path="s3://ckpts/ray", max_steps=4)
    path = write_run(cfg.storage_path, "ft", {"step": 2, "config": cfg.to_dict()})
    assert resume.latest_checkpoint_state(cfg.storage_path, "ft") == (path, {"step": 2, "config": cfg.to_dict()})
    resume.check_resume(FinetuneConfig(name="ft", storage_path="s3://ckpts/ray", max_steps=8, val_prompts="x",
                                       loader_workers=0))
    with pytest.raises(MTNError, match=r"ema_decay 0.0 -> 0.9, resolution 256 -> 512"):
        resume.check_resume(FinetuneConfig(name="ft", storage_path="s3://ckpts/ray", resolution=512, ema_decay=0.9))
    assert resume.latest_checkpoint_state(cfg.storage_path, "other") is None


# ----------------------------------------------------------------------------------------------- staging
class FakeEngine:
    """What staged_checkpoint needs of a DeepSpeed engine: parameters, the ZeRO stage, save_checkpoint."""

    def __init__(self, params: int, stage: int = 2):
        self.module = torch.nn.Linear(params, 1, bias=False)
        self.stage, self.saves = stage, 0

    def zero_optimization_stage(self):
        return self.stage

    def save_checkpoint(self, d, tag):
        self.saves += 1
        (Path(d) / tag).mkdir()
        (Path(d) / tag / "shard.pt").write_bytes(b"x" * 5000)


Usage = namedtuple("Usage", "total used free")


def test_staging_dir_is_configurable_and_sizes_are_measured(tmp_path):
    staging = tmp_path / "scratch" / "ckpt"
    engine = FakeEngine(1000)
    state = {"step": 4, "config": {"checkpoint_staging_dir": str(staging), "name": "r"}}
    assert distributed.estimate_checkpoint_bytes(engine, rank=0) == 16 * 1000  # fp32 weights + AdamW, 1 rank
    assert distributed.estimate_checkpoint_bytes(engine, rank=1) == 12 * 1000  # its optimizer shard only
    # what a rank killed mid-checkpoint left (its cleanup never ran); another rank's live folder is not touched
    # and a same-named run's rank 0 that still runs (another job with this name on this node) is not touched either
    live = f"mtn-ckpt-r-rank0-{os.getpid()}-abc"
    for leftover in ("mtn-ckpt-r-rank0-dead", "mtn-ckpt-r-rank0-999999999-x", "mtn-ckpt-r-rank1-live", live):
        (staging / leftover).mkdir(parents=True)
    with distributed.staged_checkpoint(engine, state, 0) as tmp:
        assert Path(tmp).parent == staging and (Path(tmp) / "deepspeed" / "shard.pt").is_file()
        saved = json.loads((Path(tmp) / distributed.STATE_FILE).read_text())
    assert not Path(tmp).exists()  # the staging folder is removed once Ray has it
    assert sorted(p.name for p in staging.iterdir()) == sorted([live, "mtn-ckpt-r-rank1-live"])
    assert state["checkpoint_bytes"] == {"0": 5000} and saved["checkpoint_bytes"] == {"0": 5000}


def test_too_little_space_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    engine = FakeEngine(1000)
    state = {"config": {"checkpoint_staging_dir": str(tmp_path)}, "checkpoint_bytes": {"0": 3 * 1024**3}}
    monkeypatch.setattr(distributed.shutil, "disk_usage", lambda p: Usage(8 * 1024**3, 6 * 1024**3, 2 * 1024**3))
    with pytest.raises(MTNError) as e:
        with distributed.staged_checkpoint(engine, state, 0):
            pass
    assert str(e.value) == (f"checkpoint staging: {tmp_path} has 2.00 GiB free but 1 rank(s) of this node need about "
                            "3.00 GiB to stage a checkpoint there; set checkpoint_staging_dir to a folder on a larger "
                            "disk (on Kubernetes: a bigger emptyDir/volume for it)")
    assert engine.saves == 0 and list(tmp_path.iterdir()) == []


def test_a_workers_mtn_error_reaches_the_driver_as_one_line():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from mtn.train.fit import worker_user_error

    try:
        raise MTNError("checkpoint staging: /tmp has 0.10 GiB free")
    except MTNError as e:
        wrapped = UserExceptionWithTraceback(e, "Traceback (most recent call last): ...")
    failure = WorkerGroupError("rank 1 failed", {1: wrapped})
    assert worker_user_error(failure) == "checkpoint staging: /tmp has 0.10 GiB free"
    assert worker_user_error(WorkerGroupError("x", {0: RuntimeError("bug")})) is None


def test_unregistered_checkpoint_folders_are_removed_registered_ones_kept(run, capsys):
    """A folder a lost rank never reported (not in Ray Train's snapshot) goes; the registered one stays; a snapshot
    of an unknown layout removes nothing."""
    from mtn.train.fit import tidy_checkpoints

    runs = Path(run.storage_path) / "r"
    orphan = runs / "checkpoint_2026-12-01_19-05-00.000000"
    (orphan / "deepspeed").mkdir(parents=True)
    (orphan / resume.STATE_FILE).write_text(json.dumps({"step": 4}))
    (runs / "checkpoint_notes.txt").write_text("a file, not a checkpoint folder")
    tidy_checkpoints(run)
    assert not orphan.exists() and (runs / "checkpoint_notes.txt").exists()
    assert resume.latest_checkpoint_state(run.storage_path, "r")[1]["step"] == 3  # the registered one is whole
    assert "removed 1 checkpoint folder(s) of run 'r'" in capsys.readouterr().out
    orphan.mkdir()
    (runs / resume.SNAPSHOT).write_text(json.dumps({"latest": "checkpoint_x"}))  # not Ray 2.60's layout
    assert resume.remove_unregistered_checkpoints(run.storage_path, "r") == [] and orphan.exists()
