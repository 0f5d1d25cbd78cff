"""`ray job submit -- python jobs/<job>.py` against a local `ray start --head` cluster (its own ports)."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_head import RAY, token_head

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def cluster():
    """-> (dashboard address, env for the ray CLI) of a head started for this module only."""
    # Ray 2.60 clusters require a token; the CLI only sends one in token mode. A token of the test's own, so a
    # fresh HOME (no ~/.ray/auth_token) works too.
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    with token_head(env, num_cpus=2) as address:
        yield address, env


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
