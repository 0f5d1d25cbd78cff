"""scripts/validate_k8s.py, offline: the CRD schemas made strict, and negative tests proving that each operator rule
and each built-in kind rule rejects a bad object (KubeRay v1.7.0 CRDs from $MTN_SHARED/k8s/crds)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helm_chart import crd_path
from tests.k8s_manifests import K8S, MANIFESTS, RAYJOBS, REPO, errors_of, load, one, selector_matches, vk


@pytest.fixture(scope="session")
def crds() -> Path:
    return crd_path()  # skips without the KubeRay CRDs, fails when CI=true


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
