"""The UNet finetune job end to end on tiny models: 2 Ray workers + ZeRO-2, artifacts, MLflow, failure + resume."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
JOB = ROOT / "jobs" / "finetune_unet.py"
pytestmark = pytest.mark.slow


def run_job(*overrides, cwd, env_extra=None):
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(JOB), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def mlflow_run(out: Path):
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("mtn-finetune").experiment_id])
    return client, run


def test_two_workers_zero2_train_mtn_ema_artifacts_and_registry(tmp_path):
    out = tmp_path / "run"
    p = run_job(f"output_dir={out}", "num_workers=2", "zero_stage=2", "max_steps=3", "val_every=3",
                "checkpoint_every=3", "log_every=1", "train_mtn=true", "mtn_lr=1e-4", "ema_decay=0.9",
                "snr_gamma=5.0", "noise_offset=0.05", "register_model=mtn-tiny-ft", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "== finetune_unet finished ==" in p.stdout

    import torch

    from mtn import load_translator
    from mtn.pipeline import generate, load_pipeline

    pipe = load_pipeline(str(out / "pipeline"))
    tr = load_translator(out / "translator")
    assert tr.manifest["training"]["steps"] == 3
    images = generate(pipe, tr, ["ein Hund"], seeds=[0], num_inference_steps=2, width=32, height=32)
    assert images[0].size == (32, 32)
    # the MTN trained jointly: its weights moved away from the seeded initialisation
    from mtn.pipeline import build_tiny_translator

    init = build_tiny_translator(target_dim=48, seed=0).mtn.state_dict()
    moved = max((v.float() - init[k].float()).abs().max().item() for k, v in tr.mtn.state_dict().items())
    assert moved > 0
    assert torch.isfinite(next(iter(pipe.unet.parameters()))).all()

    client, run = mlflow_run(out)
    assert run.data.params["zero_stage"] == "2" and run.data.params["num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert {"perf/images_per_s", "perf/images_per_s_per_worker", "perf/data_wait_frac"} <= set(run.data.metrics)
    assert run.data.metrics["perf/images_per_s"] > 0
    val = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert val == ["validation/step_000003.png"]  # the fixed-prompt grid
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"pipeline", "translator"} <= artifacts
    (version,) = client.search_model_versions("name='mtn-tiny-ft'")
    assert version.run_id == run.info.run_id and run.data.tags["mtn.registered_model"] == "models:/mtn-tiny-ft/1"


def train_worker_pids(root: int) -> list[int]:
    """The Ray Train worker processes under `root` (the job's own local Ray cluster: raylet -> workers), not their
    DataLoader processes (forked children, which inherit the title)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [(root, False)]
    while todo:
        parent, under_worker = todo.pop()
        for pid in children.get(parent, []):
            try:
                worker = Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker")
            except OSError:
                continue
            if worker and not under_worker:
                found.append(pid)
            todo.append((pid, under_worker or worker))
    return found


def test_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(tmp_path):
    """A real fault from outside: SIGKILL to a Ray Train worker process once a checkpoint is registered. Ray Train
    replaces the worker group, training resumes from the latest checkpoint, the step count is continuous and the
    final pipeline is published whole."""
    from mtn.train.resume import latest_checkpoint_state

    out, max_steps = tmp_path / "run", 10
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "log.txt", "w") as log_file:
        job = subprocess.Popen([sys.executable, str(JOB), f"output_dir={out}", "num_workers=2", f"max_steps={max_steps}",
                                "checkpoint_every=2", "val_every=100", "log_every=1", "max_failures=1"],
                               cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            seen = None
            for _ in range(3000):  # bounded: ~10 min of polling at most
                if job.poll() is not None:
                    break
                try:
                    seen = latest_checkpoint_state(str(out / "ray_results"), "unet-local")
                except ValueError:  # the snapshot caught mid-write
                    seen = None
                if seen:
                    break
                time.sleep(0.2)
            assert seen and job.poll() is None, (tmp_path / "log.txt").read_text()[-5000:]
            killed_after = seen[1]["step"]
            workers = train_worker_pids(job.pid)
            assert len(workers) == 2, workers
            os.kill(max(workers), signal.SIGKILL)
            job.wait(timeout=900)
        finally:
            if job.poll() is None:
                job.kill()
    log = (tmp_path / "log.txt").read_text()
    assert job.returncode == 0, log[-5000:]
    # resumed from the checkpoint seen before the kill, or a later one registered meanwhile
    resumed = re.search(r"resuming from the checkpoint at step (\d+)", log)
    assert resumed and killed_after <= int(resumed.group(1)) < max_steps, log[-5000:]
    assert int(resumed.group(1)) % 2 == 0
    from mtn.pipeline import load_pipeline

    assert load_pipeline(str(out / "pipeline")).unet is not None  # the final pipeline, whole
    final = json.loads((out / "metrics.json").read_text())  # the last step's metrics, published with the pipeline
    assert {"train/loss", "train/lr", "epoch"} <= set(final) and math.isfinite(final["train/loss"])
    assert not list(out.glob(".publish-*"))
    client, run = mlflow_run(out)  # one MLflow run across the restart; no step lost
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(set(steps)) == list(range(1, max_steps + 1))


def test_bad_config_and_missing_shards_are_one_line(tmp_path):
    for args, msg in ((["lrr=1"], "unknown config key: 'lrr'"),
                      ([f"train_shards={tmp_path}/none", "generate_shards=0"], "no shards"),
                      (["batch_size=7", "num_workers=2"], "must divide by num_workers")):
        p = run_job(f"output_dir={tmp_path}/o", *args, cwd=tmp_path)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
