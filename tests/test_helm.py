"""The Helm chart helm/mtn-serve, offline: lint and renders of several value sets (each RayService checked against the
strict KubeRay v1.7.0 CRD, the operator rules, Ray Serve's ServeDeploySchema and serve.config.AppArgs; built-in
kinds with kubernetes-validate --strict; every object against the project policy of scripts/pod_security.py),
install --dry-run=client, and k8s/rayservice.yaml = the default render. Values refused: test_helm_values.py; the
security rules one by one: test_helm_security.py; metrics, logs and `helm test`: test_helm_watch.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm_chart import CHART, GPU, REPO, by_kind, crd_path, groups, helm_path, run_helm, serve_app, vk


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return helm_path()


@pytest.fixture(scope="session")
def crds() -> Path:
    return crd_path()


LONG = "mtn-serve-with-a-very-long-name-for-the-production-cluster-euw1"  # 63 chars
VALUE_SETS = {
    "defaults": {},
    "ingress": {"ingress": {"enabled": True, "className": "nginx", "host": "mtn.example.com",
                            "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "300"},
                            "tls": {"enabled": True, "secretName": "mtn-tls"}}},
    "cpu-only": {"worker": {"gpus": 0, "nodeSelector": None, "tolerations": [],
                            "resources": {"limits": {"cpu": "4", "memory": "16Gi"}}},
                 "generator": {"numGpus": 0, "numCpus": 2}, "model": {"device": "cpu", "dtype": "float32"}},
    "fixed-replicas": {"autoscaler": {"enabled": False},
                       "worker": {"replicas": 2, "minReplicas": 2, "maxReplicas": 2},
                       "generator": {"replicas": 2, "autoscaling": {"enabled": False}}},
    "full": {"fullnameOverride": LONG,
             "image": {"tag": "", "digest": "sha256:" + "a" * 64},
             "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mtn"},
                                "worker": {"annotations": {"example.com/models": "read"}}},
             "rayAuth": {"existingSecret": "mtn-ray-token"},
             "auth": {"apiKeys": {"enabled": True, "existingSecret": "mtn-api-keys"}},
             "networkPolicy": {"serve": {"namespaces": ["ingress-nginx", "gateway"], "podLabels": {"mtn-client": "true"},
                                         "from": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]},
                               "metrics": {"from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]}},
             "metrics": {"podMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}},
             "logging": {"encoding": "TEXT", "logLevel": "DEBUG", "enableAccessLog": False},
             "podDisruptionBudget": {"minAvailable": None, "maxUnavailable": "50%"},
             "translators": {"de": "s3://mtn-models/translators/de", "fr": "models:/mtn-fr/3",
                             "multi": "models:/mtn-translator-multi/1"},
             "routes": {"english": "native", "hybrid": "multi", "fallback": "multi"},
             "env": {"awsRegion": "eu-west-1", "hfHome": "/home/ray/.cache/huggingface"},
             "extraEnv": [{"name": "MTN_LOG_LEVEL", "value": "debug"},
                          {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "mtn", "key": "token"}}}],
             "envFrom": [{"secretRef": {"name": "mtn-aws", "optional": True}}],
             "head": {"nodeSelector": {"kubernetes.io/arch": "amd64"}},
             "worker": {"gpus": 2, "maxReplicas": 2},
             "generator": {"numGpus": 0.5, "autoscaling": {"maxReplicas": 8}},
             # 8 Generator replicas x 16 ongoing + 32 queued = 160 admitted per Ingress replica: it needs more slots
             "serveIngress": {"maxOngoingRequests": 161},
             "admission": {"maxQueuedRequests": 32, "ingressMaxQueuedRequests": 512, "requestTimeoutS": 300.5,
                           "retryAfterS": 5, "maxBodyBytes": 131072},
             "httpOptions": {"requestTimeoutS": 330},
             "limits": {"maxRequestPixels": 524288},
             "batching": {"maxBatchSize": 4, "batchWaitTimeoutS": 0.1, "maxBatchPixels": 4194304}},
    "existing-sa": {"serviceAccount": {"create": False, "head": {"name": "mtn-head"}, "worker": {"name": "mtn-existing"}},
                    "networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
}


@pytest.fixture(scope="session")
def rendered(helm_bin, tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for name, values in VALUE_SETS.items():
        f = tmp_path_factory.mktemp("values") / f"{name}.yaml"
        f.write_text(yaml.safe_dump(values))
        proc = run_helm(helm_bin, "template", "mtn-serve", str(CHART), "-f", str(f))
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        out[name] = vk.load_docs(proc.stdout)
    return out


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_strict(helm_bin, tmp_path, name):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(VALUE_SETS[name]))
    proc = run_helm(helm_bin, "lint", "--strict", str(CHART), "-f", str(f))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_render_validates(rendered, crds, name):
    docs = rendered[name]
    kinds = sorted(d["kind"] for d in docs)
    expected = ["RayService", "Pod"] + (["Ingress"] if name == "ingress" else []) + (
        ["ServiceAccount", "ServiceAccount", "NetworkPolicy", "PodDisruptionBudget"] if name != "existing-sa" else []) + (
        ["PodMonitor"] if name == "full" else [])  # Pod: the `helm test` hook (test_helm_watch.py)
    assert kinds == sorted(expected)
    for obj in docs:
        checked, errors = vk.object_errors(obj, crds=crds)
        assert not errors, f"{name}: {obj['kind']}/{obj['metadata']['name']} ({checked}): {errors}"
    (rs,) = by_kind(docs, "RayService")
    assert len(rs["metadata"]["name"]) <= 47
    # the brief's two checks, spelled out (object_errors runs them too)
    from ray.serve.schema import ServeDeploySchema

    from serve.config import AppArgs

    ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    app = serve_app(rs)
    AppArgs.model_validate(app["args"])
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("mtn", "/", "serve.app:build_app")
    assert [d["name"] for d in app["deployments"]] == ["Generator", "Ingress"]


def test_default_render(rendered):
    (rs,) = by_kind(rendered["defaults"], "RayService")
    app = serve_app(rs)
    assert app["args"]["translators"] == {"multi": "models:/mtn-xlmr-large-sd15@champion"}  # k8s/rayjob-train-mtn.yaml
    assert app["args"]["pipeline"].split("@")[0] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # pinned: @<commit>
    assert app["args"]["hybrid_route"] == "multi" and app["args"]["fallback_route"] == "multi"
    gen, ingress = app["deployments"]
    assert gen["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert gen["ray_actor_options"] == {"num_gpus": 1, "num_cpus": 4} and "num_replicas" not in gen
    assert ingress == {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 128,
                       "ray_actor_options": {"num_cpus": 1}}
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    head, (worker,) = groups(rs)
    pod = worker["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"] == [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["resources"]["limits"][GPU] == 1
    assert GPU not in str(head["template"]["spec"]["containers"][0]["resources"])
    for kind, spec in (("head", head["template"]["spec"]), ("worker", pod)):
        c = spec["containers"][0]
        assert spec["serviceAccountName"] == f"mtn-serve-{kind}" and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsUser"] == 1000 and c["securityContext"]["readOnlyRootFilesystem"]
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/tmp/ray", "/home/ray/.cache"}
        assert c["image"] == "mtn-serve:0.1.0"  # the name `make image` tags by default
        assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mtn-mlflow:5000"} in c["env"]


def test_defaults_match_the_serve_config(rendered):
    """The chart's defaults are serve/config.yaml's: the app args overload values (= serve.config's defaults),
    the proxy timeout and the Ingress's slots; max_queued_requests is left to build_app (args.admission)."""
    from serve.config import Admission, AppArgs, Batching, Limits

    (rs,) = by_kind(rendered["defaults"], "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    app = config["applications"][0]
    args = AppArgs.model_validate(app["args"])
    assert args.admission == Admission()
    assert args.limits.max_request_pixels == Limits().max_request_pixels == 4 * 512 * 512
    assert args.batching.max_batch_pixels == Batching().max_batch_pixels == 8 * 512 * 512
    ref = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    ref_app = ref["applications"][0]
    assert app["args"]["admission"] == ref_app["args"]["admission"]
    assert app["args"]["limits"]["max_request_pixels"] == ref_app["args"]["limits"]["max_request_pixels"]
    assert app["args"]["batching"]["max_batch_pixels"] == ref_app["args"]["batching"]["max_batch_pixels"]
    assert config["http_options"] == {"request_timeout_s": ref["http_options"]["request_timeout_s"]} == {
        "request_timeout_s": 150}
    ref_deps = {d["name"]: d for d in ref_app["deployments"]}
    for dep in app["deployments"]:
        assert dep["max_ongoing_requests"] == ref_deps[dep["name"]]["max_ongoing_requests"]
        assert "max_queued_requests" not in dep  # would override build_app's value from args.admission
    # every field of the nested arg models is rendered (a new serve.config field must reach the chart too)
    for section in ("limits", "batching", "defaults", "admission"):
        assert set(app["args"][section]) == set(type(getattr(args, section)).model_fields), section


def test_ingress_render(rendered):
    (ing,) = by_kind(rendered["ingress"], "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": ["mtn.example.com"], "secretName": "mtn-tls"}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "mtn.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "mtn-serve-serve-svc", "port": {"number": 8000}}


def test_cpu_only_render(rendered):
    (rs,) = by_kind(rendered["cpu-only"], "RayService")
    assert GPU not in json.dumps(rs)
    assert serve_app(rs)["deployments"][0]["ray_actor_options"]["num_gpus"] == 0
    assert serve_app(rs)["args"]["device"] == "cpu"


def test_fixed_replicas_render(rendered):
    (rs,) = by_kind(rendered["fixed-replicas"], "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    (worker,) = cluster["workerGroupSpecs"]
    assert (worker["replicas"], worker["minReplicas"], worker["maxReplicas"]) == (2, 2, 2)
    gen = serve_app(rs)["deployments"][0]
    assert gen["num_replicas"] == 2 and "autoscaling_config" not in gen


def test_full_render(rendered):
    docs = rendered["full"]
    (rs,) = by_kind(docs, "RayService")
    head_sa, worker_sa = by_kind(docs, "ServiceAccount")
    assert rs["metadata"]["name"] == LONG[:47].rstrip("-")
    assert (head_sa["metadata"]["name"], worker_sa["metadata"]["name"]) == (LONG[:58].rstrip("-") + "-head", LONG[:56].rstrip("-") + "-worker")
    for sa in (head_sa, worker_sa):
        assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert "example.com/models" in worker_sa["metadata"]["annotations"]
    assert "example.com/models" not in head_sa["metadata"]["annotations"]
    assert all(len(d["metadata"]["name"]) <= 63 for d in docs)
    args = serve_app(rs)["args"]
    assert set(args["translators"]) == {"de", "fr", "multi"} and args["fallback_route"] == "multi"
    assert args["batching"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.1, "max_batch_pixels": 4194304}
    assert args["limits"]["max_request_pixels"] == 524288
    assert args["admission"] == {"max_queued_requests": 32, "ingress_max_queued_requests": 512,
                                 "request_timeout_s": 300.5, "retry_after_s": 5, "max_body_bytes": 131072}
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert config["http_options"] == {"request_timeout_s": 330}
    assert config["applications"][0]["deployments"][1]["max_ongoing_requests"] == 161
    head, (worker,) = groups(rs)
    c = worker["template"]["spec"]["containers"][0]
    assert c["image"] == "mtn-serve@sha256:" + "a" * 64
    assert c["resources"]["limits"][GPU] == 2
    names = [e["name"] for e in c["env"]]
    assert names == ["MLFLOW_TRACKING_URI", "AWS_REGION", "HF_HOME", "MTN_API_KEYS", "MTN_LOG_LEVEL", "TOKEN"]
    assert c["envFrom"] == [{"secretRef": {"name": "mtn-aws", "optional": True}}]
    assert head["template"]["spec"]["nodeSelector"] == {"kubernetes.io/arch": "amd64"}


def test_existing_service_account(rendered):
    (rs,) = by_kind(rendered["existing-sa"], "RayService")
    head, (worker,) = groups(rs)
    assert head["template"]["spec"]["serviceAccountName"] == "mtn-head"
    assert worker["template"]["spec"]["serviceAccountName"] == "mtn-existing"


def test_builtin_kinds_pass_kubernetes_validate_cli(rendered, tmp_path):
    f = tmp_path / "rendered.yaml"
    f.write_text(yaml.safe_dump_all([d for docs in rendered.values() for d in docs
                                     if d["kind"] not in ("RayService", "PodMonitor")]))  # CRDs: checked above
    exe = Path(sys.executable).with_name("kubernetes-validate")
    proc = subprocess.run([str(exe), "--strict", "-k", "1.30.0", "-k", "1.35.0", str(f)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout and proc.stdout.count("passed") >= 10


def test_install_dry_run(helm_bin):
    proc = run_helm(helm_bin, "install", "mtn-serve", str(CHART), "--dry-run=client")
    assert proc.returncode == 0, proc.stderr
    assert "kind: RayService" in proc.stdout and "port-forward svc/mtn-serve-serve-svc 8000:8000" in proc.stdout
    proc = run_helm(helm_bin, "install", "mtn-serve", str(CHART), "--dry-run=client",
                    "--set", "ingress.enabled=true,ingress.host=mtn.example.com")
    assert proc.returncode == 0, proc.stderr
    assert "http://mtn.example.com/" in proc.stdout


def test_plain_rayservice_matches_the_chart(rendered):
    plain = vk.load_docs((REPO / "k8s" / "rayservice.yaml").read_text())
    chart = [d for d in rendered["defaults"] if "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
    assert plain == chart, ("k8s/rayservice.yaml drifted from the chart; regenerate it with: "
                            ".tools/bin/helm template mtn-serve helm/mtn-serve --skip-tests (keep its header)")
