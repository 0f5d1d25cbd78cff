"""The chart's security and reliability rules (issue 13), one by one: Ray token auth, Serve API keys, the
NetworkPolicy, the workers' PodDisruptionBudget, ServiceAccounts without Kubernetes API tokens, image pinning.

Each rule is shown met by a render, and each has a values change that would break it, which the chart refuses
(values.schema.json or a template `fail`) or the project policy (scripts/pod_security.py, run by
scripts/validate_k8s.py) catches. Offline: helm template only (about 0.4 s a render).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import validate_k8s as vk  # noqa: E402
from pod_security import API_TOKEN_PATH, policy_errors, selector_matches  # noqa: E402

from tests.helm_chart import helm_path  # noqa: E402

CHART = REPO / "helm" / "mtn-serve"
SERVE, DASHBOARD, GCS, CLIENT, METRICS = 8000, 8265, 6379, 10001, 8080
AUTOSCALER_OFF = ["--set", "autoscaler.enabled=false,worker.replicas=4"]  # 4 pods hold the 4 Generator replicas


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return helm_path()


def helm(helm_bin, *args: str):
    return vk.helm("template", "mtn-serve", str(CHART), *args, helm_bin=helm_bin)


def render(helm_bin, *args: str) -> dict[str, list[dict]]:
    """helm template with these args -> {kind: [objects]}."""
    proc = helm(helm_bin, *args)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, list[dict]] = {}
    for obj in vk.load_docs(proc.stdout):
        out.setdefault(obj["kind"], []).append(obj)
    return out


def refused(helm_bin, *args: str) -> str:
    proc = helm(helm_bin, *args)
    assert proc.returncode != 0, f"{args} was accepted"
    return proc.stderr


@pytest.fixture(scope="module")
def default(helm_bin) -> dict[str, list[dict]]:
    return render(helm_bin)


def cluster_of(objs) -> dict:
    (rs,) = objs["RayService"]
    return rs["spec"]["rayClusterConfig"]


def pods(objs) -> dict[str, dict]:
    """{"head"|"worker": pod template} of the RayService."""
    cluster = cluster_of(objs)
    (worker,) = cluster["workerGroupSpecs"]
    return {"head": cluster["headGroupSpec"]["template"], "worker": worker["template"]}


def serve_args(objs) -> dict:
    (rs,) = objs["RayService"]
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]


# ------------------------------------------------------------------------------------------------ Ray token auth
@pytest.mark.parametrize("args", [[], ["--set", "rayAuth.existingSecret=mtn-ray-token"],
                                  AUTOSCALER_OFF])
def test_ray_token_auth_is_on(helm_bin, args):
    objs = render(helm_bin, *args)
    auth = cluster_of(objs)["authOptions"]
    secret = "mtn-ray-token" if "rayAuth.existingSecret=mtn-ray-token" in args else None
    assert auth == ({"mode": "token", "secretName": secret} if secret else {"mode": "token"})
    for template in pods(objs).values():  # KubeRay injects RAY_AUTH_*; nothing in the chart overrides it
        names = {e["name"] for e in template["spec"]["containers"][0].get("env") or []}
        assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    (rs,) = objs["RayService"]
    assert policy_errors(rs) == []


def test_ray_token_auth_cannot_be_switched_off(helm_bin, default):
    # through values: the env is the only door, and the chart closes it
    assert "extraEnv: RAY_AUTH_MODE is set by the chart" in refused(
        helm_bin, "--set-json", 'extraEnv=[{"name":"RAY_AUTH_MODE","value":"disabled"}]')
    assert "extraEnv: RAY_AUTH_TOKEN is set by the chart" in refused(
        helm_bin, "--set-json", 'extraEnv=[{"name":"RAY_AUTH_TOKEN","value":"x"}]')
    # in a changed template or an edited render: the policy catches it
    (rs,) = default["RayService"]
    for mode in (None, "disabled"):
        broken = copy.deepcopy(rs)
        cluster = broken["spec"]["rayClusterConfig"]
        cluster.pop("authOptions") if mode is None else cluster["authOptions"].update(mode=mode)
        assert any("authOptions.mode must be token" in e for e in policy_errors(broken))


# ------------------------------------------------------------------------------------------------ Serve API keys
def test_api_keys_come_from_the_secret(helm_bin, default):
    objs = render(helm_bin, "--set", "auth.apiKeys.enabled=true,auth.apiKeys.existingSecret=mtn-keys")
    ref = {"name": "MTN_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "mtn-keys", "key": "api-keys"}}}
    for template in pods(objs).values():
        assert ref in template["spec"]["containers"][0]["env"]
    assert "env" not in cluster_of(objs)["autoscalerOptions"]  # the sidecar serves no requests
    assert serve_args(objs)["auth"] == {"api_keys_env": "MTN_API_KEYS", "required": True}
    from serve.config import AppArgs

    assert AppArgs.model_validate(serve_args(objs)).auth.required is True
    # off by default: no keys, no auth arg (the app's own default: auth off)
    assert "auth" not in serve_args(default)
    assert "MTN_API_KEYS" not in yaml.safe_dump(default["RayService"])


def test_api_keys_need_a_secret(helm_bin):
    assert "/auth/apiKeys/existingSecret" in refused(helm_bin, "--set", "auth.apiKeys.enabled=true")
    # the template says it too (when the schema is skipped)
    assert "auth.apiKeys.enabled needs auth.apiKeys.existingSecret" in refused(
        helm_bin, "--set", "auth.apiKeys.enabled=true", "--skip-schema-validation")


# ------------------------------------------------------------------------------------------------ NetworkPolicy
OUTSIDERS = {  # pods that must not reach the Ray ports
    "other app, same namespace": {"app.kubernetes.io/name": "web", "app.kubernetes.io/component": "ray-head"},
    "other release": {"app.kubernetes.io/name": "mtn-serve", "app.kubernetes.io/instance": "other",
                      "app.kubernetes.io/component": "ray-worker"},
}


def _ports(rule) -> set[int] | None:
    return None if "ports" not in rule else {p["port"] for p in rule["ports"]}


def test_network_policy_admits_only_the_cluster_to_ray_ports(default):
    (np,) = default["NetworkPolicy"]
    spec = np["spec"]
    labels = {k: t["metadata"]["labels"] for k, t in pods(default).items()}
    assert spec["policyTypes"] == ["Ingress"]
    assert all(selector_matches(spec["podSelector"], lab) for lab in labels.values())
    own, operator, serve, helm_test = spec["ingress"]
    # every port (GCS, dashboard, client, node-to-node): the release's Ray pods in this namespace, nobody else
    (peer,) = own["from"]
    assert _ports(own) is None and set(peer) == {"podSelector"}
    assert all(selector_matches(peer["podSelector"], lab) for lab in labels.values())
    assert not any(selector_matches(peer["podSelector"], lab) for lab in OUTSIDERS.values())
    # the operator: dashboard and Serve only, selected by its pod labels
    assert _ports(operator) == {DASHBOARD, SERVE}
    assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # Serve: the ingress controller's namespace (values), nothing else
    assert _ports(serve) == {SERVE}
    assert serve["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    # the `helm test` Pod: the Serve port, selected by its own labels, which no Ray pod or outsider has
    (test_pod,) = default["Pod"]
    (peer,) = helm_test["from"]
    assert _ports(helm_test) == {SERVE} and set(peer) == {"podSelector"}
    assert selector_matches(peer["podSelector"], test_pod["metadata"]["labels"])
    assert not any(selector_matches(peer["podSelector"], lab) for lab in [*labels.values(), *OUTSIDERS.values()])
    for rule in spec["ingress"][1:]:
        assert not _ports(rule) & {GCS, CLIENT}


def test_network_policy_serve_peers_follow_the_values(helm_bin):
    objs = render(helm_bin, "--set-json", 'networkPolicy.serve.namespaces=["gateway"]', "--set-json",
                  'networkPolicy.serve.podLabels={"mtn-client":"true"}', "--set-json",
                  'networkPolicy.serve.from=[{"ipBlock":{"cidr":"10.0.0.0/16"}}]', "--set-json",
                  'networkPolicy.metrics.from=[{"namespaceSelector":{"matchLabels":{"name":"monitoring"}}}]')
    (np,) = objs["NetworkPolicy"]
    _, _, serve, metrics, _ = np["spec"]["ingress"]
    assert _ports(serve) == {SERVE} and serve["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}},
        {"podSelector": {"matchLabels": {"mtn-client": "true"}}},  # no namespaceSelector: this namespace only
        {"ipBlock": {"cidr": "10.0.0.0/16"}}]
    assert _ports(metrics) == {METRICS}
    # no Serve peers at all: the rule is left out (only the cluster and the operator remain)
    (np,) = render(helm_bin, "--set-json", "networkPolicy.serve.namespaces=[]")["NetworkPolicy"]
    assert [_ports(r) for r in np["spec"]["ingress"]] == [None, {DASHBOARD, SERVE}, {SERVE}]  # + the helm test Pod


def test_network_policy_breaking_values_are_refused(helm_bin):
    # an operator peer without pod labels would open the dashboard to a whole namespace (or all of them)
    assert "networkPolicy.operator.from[0] needs a podSelector with labels" in refused(
        helm_bin, "--set-json", 'networkPolicy.operator.from=[{"namespaceSelector":{}}]')
    # a pod label that overrides the selector labels would take the pods out of the policy
    for key in ("head.podLabels", "worker.podLabels", "commonLabels"):
        assert f"{key} must not set app.kubernetes.io/component" in refused(
            helm_bin, "--set", f"{key}.app\\.kubernetes\\.io/component=x")
    # an empty peer (= everyone) on the Serve port
    assert "minProperties" in refused(helm_bin, "--set-json", "networkPolicy.serve.from=[{}]")


# ------------------------------------------------------------------------------------------------ PodDisruptionBudget
def test_pdb_covers_the_serving_workers_only(helm_bin, default):
    (pdb,) = default["PodDisruptionBudget"]
    labels = {k: t["metadata"]["labels"] for k, t in pods(default).items()}
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert selector_matches(pdb["spec"]["selector"], labels["worker"])
    assert not selector_matches(pdb["spec"]["selector"], labels["head"])
    assert not any(selector_matches(pdb["spec"]["selector"], lab) for lab in OUTSIDERS.values())
    (pdb,) = render(helm_bin, "--set", "podDisruptionBudget.minAvailable=null,podDisruptionBudget.maxUnavailable=50%"
                    )["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == "50%" and "minAvailable" not in pdb["spec"]
    assert "not both" in refused(helm_bin, "--set", "podDisruptionBudget.maxUnavailable=1")


# ------------------------------------------------------------------------------------------------ ServiceAccounts
def _mounts_api_token(container) -> bool:
    return any(m["mountPath"].startswith(API_TOKEN_PATH) for m in container.get("volumeMounts") or [])


@pytest.mark.parametrize("autoscaler", [True, False])
def test_no_ray_container_mounts_an_api_token(helm_bin, autoscaler):
    objs = render(helm_bin, *([] if autoscaler else AUTOSCALER_OFF))
    head_sa, worker_sa = objs["ServiceAccount"]
    assert head_sa["metadata"]["name"] != worker_sa["metadata"]["name"]
    assert head_sa["automountServiceAccountToken"] is False and worker_sa["automountServiceAccountToken"] is False
    templates = pods(objs)
    for kind, sa in (("head", head_sa), ("worker", worker_sa)):
        spec = templates[kind]["spec"]
        assert spec["serviceAccountName"] == sa["metadata"]["name"] and spec["automountServiceAccountToken"] is False
        assert not _mounts_api_token(spec["containers"][0])
    cluster = cluster_of(objs)
    head_volumes = {v["name"]: v for v in templates["head"]["spec"]["volumes"]}
    if autoscaler:  # KubeRay binds the autoscaler Role to the head account; only the sidecar mounts its token
        (mount,) = [m for m in cluster["autoscalerOptions"]["volumeMounts"] if m["mountPath"] == API_TOKEN_PATH]
        sources = head_volumes[mount["name"]]["projected"]["sources"]
        assert mount["readOnly"] and sources[0]["serviceAccountToken"]["path"] == "token"
        assert {"key": "ca.crt", "path": "ca.crt"} in sources[1]["configMap"]["items"]
    else:
        assert "autoscalerOptions" not in cluster
        assert not any("projected" in v for v in head_volumes.values())
    (rs,) = objs["RayService"]
    assert policy_errors(rs) == [] and policy_errors(head_sa) == []


def test_api_token_rules_catch_a_broken_render(helm_bin, default):
    (rs,) = default["RayService"]
    broken = copy.deepcopy(rs)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["automountServiceAccountToken"] = True
    assert any("automountServiceAccountToken must be false" in e for e in policy_errors(broken))
    broken = copy.deepcopy(rs)
    mounts = broken["spec"]["rayClusterConfig"]["autoscalerOptions"]["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != API_TOKEN_PATH]
    assert any("the autoscaler needs a projected serviceAccountToken" in e for e in policy_errors(broken))
    # one account for both would hand the workers the autoscaler's rights
    assert "are equal" in refused(helm_bin, "--set", "serviceAccount.head.name=a,serviceAccount.worker.name=a")


# ------------------------------------------------------------------------------------------------ image
DIGEST = "sha256:" + "b" * 64


def test_image_is_pinned(helm_bin, default):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == chart["appVersion"]
    images = {t["spec"]["containers"][0]["image"] for t in pods(default).values()}
    assert images == {f"mtn-serve:{chart['appVersion']}"}
    both = render(helm_bin, "--set", f"image.digest={DIGEST}")
    only = render(helm_bin, "--set", f"image.digest={DIGEST},image.tag=")
    assert pods(both)["worker"]["spec"]["containers"][0]["image"].endswith(f":0.1.0@{DIGEST}")
    assert pods(only)["head"]["spec"]["containers"][0]["image"] == f"mtn-serve@{DIGEST}"


def test_empty_tag_is_refused(helm_bin):
    assert "/image/tag" in refused(helm_bin, "--set", "image.tag=")
    assert "image.tag is empty: set image.tag" in refused(helm_bin, "--set", "image.tag=", "--skip-schema-validation")
    assert "/image/digest" in refused(helm_bin, "--set", "image.digest=sha256:abc")
