"""The plain manifests in k8s/ and the validator scripts/validate_k8s.py, offline.

KubeRay objects are checked against the KubeRay v1.7.0 CRDs in $MTN_SHARED/k8s/crds (default <repo>/../shared; the
tests skip without them, or fail when CI=true), made strict, plus the operator rules; built-in kinds with
kubernetes-validate --strict. Negative tests prove each rule rejects a bad object.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import validate_k8s as vk  # noqa: E402
from pod_security import selector_matches  # noqa: E402

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


@pytest.fixture(scope="session")
def crds() -> Path:
    if not (vk.crd_dir() / "ray.io_rayjobs.yaml").is_file():
        msg = f"KubeRay CRDs not found in {vk.crd_dir()} (set $MTN_SHARED to the folder holding k8s/crds/)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg} (CI=true: they must be present)")
        pytest.skip(msg)
    return vk.crd_dir()


def load(name: str) -> list[dict]:
    return vk.load_docs((K8S / name).read_text())


def one(name: str, kind: str) -> dict:
    (obj,) = [d for d in load(name) if d["kind"] == kind]
    return copy.deepcopy(obj)


def errors_of(obj: dict, crds: Path) -> list[str]:
    return vk.object_errors(obj, crds=crds)[1]


def container_env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


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


# ------------------------------------------------------------------------------------------------ the validator
def test_strict_schema_conversion():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"c": {}}},
        "map": {"type": "object", "additionalProperties": {"type": "object", "properties": {"d": {}}}},
        "port": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {"e": {}}}},
    }}
    s = vk.strict_schema(schema)
    assert s["additionalProperties"] is False and s["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["free"]
    assert s["properties"]["map"]["additionalProperties"]["additionalProperties"] is False
    assert s["properties"]["port"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    assert s["properties"]["maybe"]["type"] == ["string", "null"]
    assert s["properties"]["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is not modified


def _worker(obj):
    return obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _head_container(obj):
    return obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _serve_config(rs: dict, mutate) -> dict:
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    mutate(config["applications"][0])
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    return rs


JOB = "rayjob-train-mtn.yaml"
JOB_CASES = {  # mutation of the training RayJob -> expected error text
    "name 50 chars": (lambda o: o["metadata"].update(name="a" * 50), "has 50 characters; KubeRay accepts at most 47"),
    "name not DNS-1035": (lambda o: o["metadata"].update(name="Train_MTN"), "is not a DNS-1035 label"),
    "name starts with digit": (lambda o: o["metadata"].update(name="1train"), "is not a DNS-1035 label"),
    "ttl without shutdown": (lambda o: o["spec"].update(shutdownAfterJobFinishes=False),
                             "ttlSecondsAfterFinished is set but shutdownAfterJobFinishes is not true"),
    "shutdown without ttl": (lambda o: o["spec"].pop("ttlSecondsAfterFinished"),
                             "shutdownAfterJobFinishes is true but ttlSecondsAfterFinished is not set"),
    "negative ttl": (lambda o: o["spec"].update(ttlSecondsAfterFinished=-5), "must be >= 0"),
    "unknown spec field": (lambda o: o["spec"].update(shutdownAfterJobFinish=True),
                           "'shutdownAfterJobFinish' was unexpected"),
    "unknown container field": (lambda o: _head_container(o).update(resource={}), "'resource' was unexpected"),
    "wrong type": (lambda o: _worker(o).update(replicas="two"), "'two' is not of type 'integer'"),
    "missing maxReplicas": (lambda o: _worker(o).pop("maxReplicas"), "'maxReplicas' is a required property"),
    "bad quantity type": (lambda o: _head_container(o)["resources"]["limits"].update(cpu=[4]), "is not valid under any"),
    "min > max": (lambda o: _worker(o).update(minReplicas=3, replicas=3), "minReplicas (3) > maxReplicas (1)"),
    "replicas out of range": (lambda o: _worker(o).update(replicas=5), "replicas (5) is outside [minReplicas"),
    "duplicate group": (lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"].append(copy.deepcopy(_worker(o))),
                        "groupName 'a100' is used twice"),
    "no resources": (lambda o: _head_container(o).pop("resources"), "container 'ray-head' has no resources"),
    "no entrypoint": (lambda o: o["spec"].pop("entrypoint"), "spec.entrypoint: empty"),
    "no cluster": (lambda o: o["spec"].pop("rayClusterSpec"), "one of rayClusterSpec or clusterSelector"),
    "bad runtimeEnvYAML": (lambda o: o["spec"].update(runtimeEnvYAML="- a\n- b"), "not a YAML mapping"),
    "root container": (lambda o: _head_container(o)["securityContext"].update(runAsNonRoot=False, runAsUser=0),
                       "runAsNonRoot must be true"),
    "privilege escalation": (lambda o: _head_container(o)["securityContext"].pop("allowPrivilegeEscalation"),
                             "allowPrivilegeEscalation must be false"),
    "capabilities kept": (lambda o: _head_container(o)["securityContext"].pop("capabilities"),
                          "capabilities.drop must include ALL"),
    # issue 13: Ray token auth and no Kubernetes API tokens
    "no Ray auth": (lambda o: o["spec"]["rayClusterSpec"].pop("authOptions"), "authOptions.mode must be token"),
    "Ray auth disabled": (lambda o: o["spec"]["rayClusterSpec"]["authOptions"].update(mode="disabled"),
                          "authOptions.mode must be token"),
    "Ray too old for token auth": (lambda o: o["spec"]["rayClusterSpec"].update(rayVersion="2.51.0"),
                                   "token auth needs rayVersion >= 2.52.0"),
    "k8s token auth on a RayJob": (lambda o: o["spec"]["rayClusterSpec"]["authOptions"].update(enableK8sTokenAuth=True),
                                   "KubeRay supports it on a standalone RayCluster only"),
    "env turns auth off": (lambda o: _head_container(o)["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"}),
                           "RAY_AUTH_MODE='disabled' turns Ray token auth off"),
    "inline token": (lambda o: _worker(o)["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN", "value": "abc"}), "RAY_AUTH_TOKEN is inline"),
    "worker mounts API token": (lambda o: _worker(o)["template"]["spec"].pop("automountServiceAccountToken"),
                                "workerGroupSpecs[0].template: automountServiceAccountToken must be false"),
    "submitter mounts API token": (lambda o: o["spec"]["submitterPodTemplate"]["spec"].update(
        automountServiceAccountToken=True), "spec.submitterPodTemplate: automountServiceAccountToken must be false"),
}


@pytest.mark.parametrize("case", JOB_CASES)
def test_rayjob_rule_rejects(crds, case):
    obj = one(JOB, "RayJob")
    assert errors_of(obj, crds) == []
    mutate, expected = JOB_CASES[case]
    mutate(obj)
    errors = errors_of(obj, crds)
    assert any(expected in e for e in errors), errors


SERVICE_CASES = {
    "name 48 chars": (lambda o: o["metadata"].update(name="s" * 48), "has 48 characters; KubeRay accepts at most 47"),
    "unknown spec field": (lambda o: o["spec"].update(serveConfig="x"), "'serveConfig' was unexpected"),
    "serveConfigV2 not YAML": (lambda o: o["spec"].update(serveConfigV2="applications: [\n"), "invalid YAML"),
    "serveConfigV2 schema": (lambda o: _serve_config(o, lambda a: a.update(import_path=3)),
                             "(ServeDeploySchema) applications.0.import_path"),
    "replicas with autoscaling": (lambda o: _serve_config(o, lambda a: a["deployments"][0].update(num_replicas=2)),
                                  "(ServeDeploySchema)"),
    "serve autoscaling min > max": (
        lambda o: _serve_config(o, lambda a: a["deployments"][0]["autoscaling_config"].update(min_replicas=9)),
        "max_replicas (4) must be greater than or equal to min_replicas (9)"),
    "more GPUs than a pod has": (
        lambda o: _serve_config(o, lambda a: a["deployments"][0]["ray_actor_options"].update(num_gpus=2)),
        "num_gpus=2 but no worker pod has that many"),
    "unknown app arg": (lambda o: _serve_config(o, lambda a: a["args"].update(pipline="x")),
                        "(serve.config.AppArgs) pipline: Extra inputs are not permitted"),
    "bad route": (lambda o: _serve_config(o, lambda a: a["args"].update(hybrid_route="xx")),
                  "hybrid_route='xx' is neither 'native' nor a key of translators"),
    "bad limit": (lambda o: _serve_config(o, lambda a: a["args"]["limits"].update(max_images=0)),
                  "limits.max_images"),
    "bad upgrade strategy": (lambda o: o["spec"]["upgradeStrategy"].update(type="Rolling"), "is not NewCluster"),
    "no Ray auth": (lambda o: o["spec"]["rayClusterConfig"].pop("authOptions"),
                    "spec.rayClusterConfig.authOptions.mode must be token"),
    "autoscaler without API token": (lambda o: o["spec"]["rayClusterConfig"]["autoscalerOptions"]["volumeMounts"].pop(),
                                     "the autoscaler needs a projected serviceAccountToken volume"),
    "head mounts API token": (
        lambda o: o["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"].update(
            automountServiceAccountToken=True), "headGroupSpec.template: automountServiceAccountToken must be false"),
}


@pytest.mark.parametrize("case", SERVICE_CASES)
def test_rayservice_rule_rejects(crds, case):
    obj = one("rayservice.yaml", "RayService")
    assert errors_of(obj, crds) == []
    mutate, expected = SERVICE_CASES[case]
    mutate(obj)
    errors = errors_of(obj, crds)
    assert any(expected in e for e in errors), errors


def test_service_account_rule_rejects(crds):
    for name in MANIFESTS:
        for sa in [d for d in load(name) if d["kind"] == "ServiceAccount"]:
            assert sa["automountServiceAccountToken"] is False and errors_of(sa, crds) == []
            sa.pop("automountServiceAccountToken")
            assert any("automountServiceAccountToken must be false" in e for e in errors_of(sa, crds))


def test_k8s_token_auth_needs_no_secret_name(crds):
    """A standalone RayCluster may delegate to Kubernetes tokens, but not together with a token Secret."""
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
               "spec": copy.deepcopy(one(JOB, "RayJob")["spec"]["rayClusterSpec"])}
    cluster["spec"]["authOptions"].update(enableK8sTokenAuth=True)
    assert errors_of(cluster, crds) == []
    cluster["spec"]["authOptions"]["secretName"] = "t"
    assert any("enableK8sTokenAuth and secretName cannot both be set" in e for e in errors_of(cluster, crds))


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_network_policy(name):
    """The job's NetworkPolicy selects its head and workers; only the job's own pods (submitter included) reach
    them on any port; the KubeRay operator reaches the dashboard and nothing else; nobody else gets a rule."""
    job = one(name, "RayJob")
    policy = one(name, "NetworkPolicy")["spec"]
    cluster = job["spec"]["rayClusterSpec"]
    labels = {"head": cluster["headGroupSpec"]["template"]["metadata"]["labels"],
              "worker": _worker(job)["template"]["metadata"]["labels"],
              "submitter": job["spec"]["submitterPodTemplate"]["metadata"]["labels"]}
    other_job = one("rayjob-finetune-unet.yaml" if name == JOB else JOB, "RayJob")
    other_head = other_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert selector_matches(policy["podSelector"], labels["head"]) and selector_matches(policy["podSelector"],
                                                                                         labels["worker"])
    assert not selector_matches(policy["podSelector"], labels["submitter"])
    own, operator = policy["ingress"]
    (peer,) = own["from"]
    assert "ports" not in own and set(peer) == {"podSelector"}  # same namespace only
    assert all(selector_matches(peer["podSelector"], lab) for lab in labels.values())
    assert not selector_matches(peer["podSelector"], other_head)  # another job's pods are outsiders
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    (op,) = operator["from"]
    assert op["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}


def test_raycluster_name_limit_is_53(crds):
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c" * 53},
               "spec": copy.deepcopy(one(JOB, "RayJob")["spec"]["rayClusterSpec"])}
    assert errors_of(cluster, crds) == []
    cluster["metadata"]["name"] = "c" * 54
    assert any("at most 53" in e for e in errors_of(cluster, crds))


def test_builtin_kind_rules_reject(crds):
    deploy = one("mlflow.yaml", "Deployment")
    deploy["spec"]["replicas"] = "one"
    assert any("spec.replicas: 'one' is not of type 'integer'" in e for e in errors_of(deploy, crds))
    deploy = one("mlflow.yaml", "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/"
    assert any("'paht' was unexpected" in e for e in errors_of(deploy, crds))
    deploy = one("mlflow.yaml", "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    assert any("privileged containers are not allowed" in e for e in errors_of(deploy, crds))
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("Couldn't find schema" in e for e in errors_of(unknown, crds))


def test_cli(crds, tmp_path):
    script = REPO / "scripts" / "validate_k8s.py"
    env = {**os.environ, "MTN_SHARED": str(crds.parents[1])}
    proc = subprocess.run([sys.executable, str(script), *sorted(map(str, K8S.glob("*.yaml")))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == sum(map(len, MANIFESTS.values())) and all(line.startswith("OK  ") for line in lines)

    bad = one(JOB, "RayJob")
    bad["spec"].pop("shutdownAfterJobFinishes")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "bad.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout.startswith("FAIL  "), proc.stdout + proc.stderr
    assert "ttlSecondsAfterFinished is set but shutdownAfterJobFinishes is not true" in proc.stdout

    proc = subprocess.run([sys.executable, str(script), str(K8S / JOB)], capture_output=True, text=True,
                          env={**env, "MTN_SHARED": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2 and "KubeRay CRD not found" in proc.stderr and "MTN_SHARED" in proc.stderr
