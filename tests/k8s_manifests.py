"""Shared by the k8s/ manifest tests and the validator tests: the manifests listed with their kinds, and small
readers of them (the KubeRay CRDs come from tests.helm_chart.crd_path)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import validate_k8s as vk  # noqa: E402
from pod_security import selector_matches  # noqa: E402, F401  (re-exported for the tests)

K8S = REPO / "k8s"
MANIFESTS = {
    "pvc-hf-cache.yaml": ["PersistentVolumeClaim"],
    "rayjob-extract-features.yaml": ["ServiceAccount", "ServiceAccount", "RayJob", "NetworkPolicy"],
    "rayjob-train-mtn.yaml": ["ServiceAccount", "ServiceAccount", "RayJob", "NetworkPolicy"],
    "rayjob-train-mtn-t5.yaml": ["ServiceAccount", "ServiceAccount", "RayJob", "NetworkPolicy"],
    "rayjob-finetune-unet.yaml": ["ServiceAccount", "ServiceAccount", "RayJob", "NetworkPolicy"],
    "rayservice.yaml": ["NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "ServiceAccount", "RayService"],
    "mlflow.yaml": ["ConfigMap", "ServiceAccount", "Deployment", "Service"],
}


RAYJOBS = [name for name, kinds in MANIFESTS.items() if "RayJob" in kinds]


def load(name: str) -> list[dict]:
    return vk.load_docs((K8S / name).read_text())


def one(name: str, kind: str) -> dict:
    (obj,) = [d for d in load(name) if d["kind"] == kind]
    return copy.deepcopy(obj)


def errors_of(obj: dict, crds: Path) -> list[str]:
    return vk.object_errors(obj, crds=crds)[1]


def container_env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env") or []}
