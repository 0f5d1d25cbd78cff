"""The plain manifests in k8s/, offline: each listed, valid against the KubeRay v1.7.0 CRDs made strict plus the
operator rules (built-in kinds: kubernetes-validate --strict), and each RayJob's entrypoint a valid job command.
The validator itself (scripts/validate_k8s.py): tests/test_validate_k8s.py; shared pieces: tests/k8s_manifests.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helm_chart import crd_path
from tests.k8s_manifests import K8S, MANIFESTS, RAYJOBS, REPO, container_env, load, one, vk


@pytest.fixture(scope="session")
def crds() -> Path:
    return crd_path()  # skips without the KubeRay CRDs, fails when CI=true


# ------------------------------------------------------------------------------------------------ the manifests
def test_every_manifest_is_listed():
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates(crds, name):
    text = (K8S / name).read_text()
    assert text.startswith("#") and "kubectl apply" in text.split("\n---")[0].split("\napiVersion")[0], \
        f"{name}: needs a header comment saying how to apply it"
    docs = load(name)
    assert [d["kind"] for d in docs] == MANIFESTS[name]
    for obj in docs:
        checked, errors = vk.object_errors(obj, crds=crds)
        assert not errors, f"{name}: {obj['kind']}/{obj['metadata']['name']} ({checked}): {errors}"


def test_train_rayjob():
    job = one("rayjob-train-mtn.yaml", "RayJob")
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["entrypoint"].startswith("python jobs/train_mtn.py --config jobs/configs/xlmr-large_sd15.yaml ")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600  # 1 h of logs
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    (worker,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    pod = worker["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_train_entrypoint_is_a_valid_train_mtn_command(monkeypatch):
    """The entrypoint's config and key=value overrides load with jobs/train_mtn.py's own config code, with the
    pods' environment (data, features and outputs on S3, use_gpu with one worker per GPU)."""
    from mtn.config import load_config

    job = one("rayjob-train-mtn.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "jobs/train_mtn.py", "--config", "jobs/configs/xlmr-large_sd15.yaml"]
    assert (REPO / argv[3]).is_file() and (REPO / argv[1]).is_file()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for key, value in container_env(head).items():
        monkeypatch.setenv(key, value)
    cfg = load_config(REPO / argv[3], argv[4:])
    (worker,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.use_gpu and cfg.num_workers * cfg.gpus_per_worker == worker["replicas"] * gpus
    for path in (cfg.output_dir, cfg.storage_path, cfg.feature_cache, cfg.source_file):
        assert path.startswith("s3://"), path


def test_extract_rayjob_and_the_hub_cache_claim():
    """The extraction is a valid extract_features command whose encoder actors fill the GPU workers; every Ray pod of
    the jobs that read hub encoders mounts the claim at HF_HOME; HF_TOKEN comes only from an optional Secret."""
    from pod_security import pod_specs

    from mtn.config import load_config

    job = one("rayjob-extract-features.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "jobs/extract_features.py", "--config"] and (REPO / argv[3]).is_file()
    cfg = load_config(REPO / argv[3], argv[4:])
    (worker,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert cfg.extract_workers * cfg.extract_gpus_per_worker == worker["replicas"] * gpus
    assert cfg.feature_cache.startswith("s3://") and cfg.val_feature_cache.startswith("s3://")
    (fetch,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert fetch["args"][1:] == [argv[3]]  # it downloads the encoders of the entrypoint's config
    claim = one("pvc-hf-cache.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # head and workers on several nodes at once
    for name in ("rayjob-extract-features.yaml", "rayjob-train-mtn.yaml", "rayjob-train-mtn-t5.yaml"):
        for where, pod in pod_specs(one(name, "RayJob")):
            if where == "spec.submitterPodTemplate":
                continue
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod.get("initContainers", []) + pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                hf_home = container_env(c)["HF_HOME"]
                assert volumes[mounts[hf_home]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
                for e in c["env"]:
                    if e["name"] == "HF_TOKEN":
                        assert "value" not in e and e["valueFrom"]["secretKeyRef"]["optional"] is True, (name, e)


def test_finetune_rayjob():
    job = one("rayjob-finetune-unet.yaml", "RayJob")
    from mtn.config import load_config
    from mtn.finetune_config import FinetuneConfig

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "jobs/finetune_unet.py", "--config", "jobs/configs/finetune_sd14_t5.yaml"]
    cfg = load_config(REPO / argv[3], argv[4:], cls=FinetuneConfig)
    (worker,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 8 and cfg.use_gpu and cfg.num_workers * cfg.gpus_per_worker == worker["replicas"] * gpus
    assert cfg.output_dir.startswith("s3://") and cfg.storage_path.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and "ttlSecondsAfterFinished" in job["spec"]


def test_jobs_and_serving_point_at_the_mlflow_service():
    svc = one("mlflow.yaml", "Service")
    url = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    for name in RAYJOBS:
        cluster = one(name, "RayJob")["spec"]["rayClusterSpec"]
        pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
        for group in pods:
            assert container_env(group["template"]["spec"]["containers"][0])["MLFLOW_TRACKING_URI"] == url
    rs = one("rayservice.yaml", "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container_env(head)["MLFLOW_TRACKING_URI"] == url


def test_mlflow_deployment():
    docs = load("mlflow.yaml")
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(c["command"] + c["args"])
    assert "mlflow server --host=0.0.0.0 --port=5000" in args and "--serve-artifacts" in args
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    assert config["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "mtn-mlflow:*" in config["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    (db,) = [e for e in c["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert "secretKeyRef" in db["valueFrom"]  # never inline
    assert {"secretRef": {"name": "mtn-mlflow-aws", "optional": True}} in c["envFrom"]
    assert not any(k in str(docs) for k in ("AWS_SECRET_ACCESS_KEY\": \"", "password@"))
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["httpGet"]["path"] == "/health"


def test_kubernetes_validate_cli_on_mlflow():
    exe = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run([str(exe), "--strict", "-k", "1.30.0", str(K8S / "mlflow.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("passed") == 4, proc.stdout + proc.stderr
