"""Ray token auth as KubeRay v1.7 wires it (authOptions: {mode: token}), against a real local Ray 2.60 head.

KubeRay gives the head RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the token Secret) and puts the same two variables
into the RayJob submitter next to its own (RAY_DASHBOARD_ADDRESS, RAY_JOB_SUBMISSION_ID, PYTHONUNBUFFERED). Here the
submitter of k8s/rayjob-train-mtn.yaml runs KubeRay's K8sJobMode shell command (common/job.go BuildJobSubmitCommand:
wait for /api/gcs_healthz, `ray job status`, `ray job submit --no-wait`, `ray job logs --follow`) with that env and
gets its job run; a pod without the token, or with another one, is refused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.ray_head import RAY, token_head

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def base_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS/RAY_AUTH_* leaking in
    # HOME: no ~/.ray/auth_token of this machine; PATH: the `ray` and `python` of this venv, as in the image
    return {**env, "HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '')}",
            "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}


@pytest.fixture(scope="module")
def head():
    """-> (dashboard address, token) of a local head started the way KubeRay starts it with authOptions token."""
    token = secrets.token_urlsafe(32)
    home = Path(tempfile.mkdtemp(prefix="rah"))
    try:
        with token_head({**base_env(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, num_cpus=1) as address:
            yield address, token
    finally:
        shutil.rmtree(home, ignore_errors=True)


def kuberay_submitter_command(address: str, job_id: str, entrypoint: str) -> str:
    """KubeRay v1.7.0's K8sJobMode submitter command (ray-operator/controllers/ray/common/job.go, run with bash -e),
    its wait for a healthy dashboard bounded to 120 tries here."""
    health = (f"python -c \"import urllib.request; r=urllib.request.urlopen('{address}/api/gcs_healthz', timeout=5); "
              "exit(0 if b'success' in r.read() else 1)\"")
    return (f"for i in $(seq 120); do {health} >/dev/null 2>&1 && break; sleep 1; done; "
            f"if ! ray job status --address {address} {job_id} >/dev/null 2>&1 ; "
            f"then ray job submit --address {address} --no-wait --submission-id {job_id} -- {entrypoint} ; fi ; "
            f"ray job logs --address {address} --follow {job_id}")


def submitter_env(address: str, job_id: str, home: Path, token: str | None) -> dict:
    """The submitter container's env: the manifest's own, then what KubeRay adds (configureSubmitterContainer)."""
    docs = [d for d in yaml.safe_load_all((REPO / "k8s" / "rayjob-train-mtn.yaml").read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (container,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    env = {**base_env(home), **{e["name"]: e["value"] for e in container.get("env") or []}}
    env.update(PYTHONUNBUFFERED="1", RAY_DASHBOARD_ADDRESS=address.removeprefix("http://"), RAY_JOB_SUBMISSION_ID=job_id)
    if token is not None:  # SetContainerTokenAuthEnvVars: mode token, the token from the Secret (key auth_token)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def run_submitter(address: str, token: str | None, job_id: str, tmp_path: Path) -> subprocess.CompletedProcess:
    home = tmp_path / f"home-{job_id}"
    home.mkdir()
    command = kuberay_submitter_command(address, job_id, "python -c \"print('mtn-submitted-' + 'ok')\"")
    return subprocess.run(["bash", "-ec", command], env=submitter_env(address, job_id, home, token),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kuberay_submitter_works_with_the_token_and_nothing_else_does(head, tmp_path):
    address, token = head
    ok = run_submitter(address, token, "mtn-auth-ok", tmp_path)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "mtn-submitted-ok" in ok.stdout
    # another pod of the cluster: no token (the open door of issue 13), or the wrong one
    for name, bad in (("none", None), ("wrong", secrets.token_urlsafe(32))):
        home = tmp_path / f"home-{name}"
        home.mkdir()
        proc = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", f"mtn-auth-{name}", "--",
                               "python", "-c", "print('mtn-submitted-' + 'bad')"],
                              env=submitter_env(address, f"mtn-auth-{name}", home, bad),
                              capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "mtn-submitted-bad" not in out, f"{name}: {out[-2000:]}"
        assert "token authentication" in out, f"{name}: {out[-2000:]}"
