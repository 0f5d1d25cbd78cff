"""`ray job submit -- python jobs/<job>.py` against a local `ray start --head` cluster (its own ports)."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """-> (dashboard address, env for the ray CLI) of a head started for this module only."""
    gcs, dash = free_port(), free_port()
    # every port of its own, so the test never collides with another Ray on the machine
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port", "ray-client-server-port")]
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # Ray 2.60 clusters require a token; the CLI only sends one in token mode. A token of the test's own, so a
    # fresh HOME (no ~/.ray/auth_token) works too.
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    # --block keeps `ray start` in the foreground: terminating it stops exactly this cluster (no global `ray stop`)
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--temp-dir={ray_tmp}", "--disable-usage-stats", *ports],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        for _ in range(120):  # the job server answers a few seconds after start
            assert head.poll() is None, "`ray start --head` exited"
            if subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail("the Ray job server did not answer within 120 s")
        yield address, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def submit(cluster, job: str, *overrides) -> subprocess.CompletedProcess:
    address, env = cluster
    return subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable,
                           str(ROOT / "jobs" / job), *overrides], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_ray_job_submit_runs_the_training_job(cluster, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, "train_mtn.py", f"output_dir={out}", "max_steps=2", "val_every=2", "checkpoint_every=2",
                 "corpus=generated:100", "hidden_dim=16")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "== train_mtn finished ==" in job.stdout
    assert (out / "translator" / "translator.json").is_file()


@pytest.mark.slow
def test_ray_job_submit_runs_the_finetune_job_on_its_default_config(cluster, tmp_path):
    out = tmp_path / "ft"
    # the default config (finetune_local.yaml), only shorter and in a temporary folder
    job = submit(cluster, "finetune_unet.py", f"output_dir={out}", "max_steps=2", "val_every=2", "checkpoint_every=2")
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "== finetune_unet finished ==" in job.stdout
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "translator" / "translator.json").is_file()
