"""The Helm chart helm/mtn-serve for the tests: where it is, the pinned helm binary and the KubeRay CRDs (fixtures),
renders as parsed objects. Helm comes from scripts/get_helm.sh (.tools/bin/helm) or $HELM; without it the chart tests
skip, or fail when CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import validate_k8s as vk  # noqa: E402

CHART = REPO / "helm" / "mtn-serve"
GPU = "nvidia.com/gpu"


def _missing(msg: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} (CI=true: it must be installed)")
    pytest.skip(msg)


def helm_path() -> Path:
    """The helm binary (a module's `helm_bin` fixture); skips without it (fails when CI=true)."""
    path = vk.find_helm()
    if path is None:
        _missing("helm not found at .tools/bin/helm or $HELM: run scripts/get_helm.sh")
    return path


def crd_path() -> Path:
    """The folder of the KubeRay CRDs (a module's `crds` fixture); skips without them (fails when CI=true)."""
    if not (vk.crd_dir() / "ray.io_rayservices.yaml").is_file():
        _missing(f"KubeRay CRDs not found in {vk.crd_dir()} (set $MTN_SHARED to the folder holding k8s/crds/)")
    return vk.crd_dir()


def run_helm(helm_bin: Path, *args: str) -> subprocess.CompletedProcess:
    return vk.helm(*args, helm_bin=helm_bin)


def render(helm_bin: Path, *args: str) -> list[dict]:
    """`helm template mtn-serve <chart> *args` -> its objects (hooks included)."""
    proc = run_helm(helm_bin, "template", "mtn-serve", str(CHART), *args)
    assert proc.returncode == 0, proc.stderr
    return vk.load_docs(proc.stdout)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def serve_app(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]


def groups(rayservice: dict) -> tuple[dict, list[dict]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"], cluster["workerGroupSpecs"]
