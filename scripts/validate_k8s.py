#!/usr/bin/env python
"""Validate Kubernetes manifests offline (no cluster, no network).

    python scripts/validate_k8s.py k8s/*.yaml
    .tools/bin/helm template mtn-serve helm/mtn-serve | python scripts/validate_k8s.py -
    python scripts/validate_k8s.py --chart helm/mtn-serve -f my-values.yaml --set worker.gpus=2

KubeRay kinds (RayService, RayJob, RayCluster) are checked against the KubeRay v1.7.0 CRDs in
$MTN_SHARED/k8s/crds (default: <repo>/../shared) made strict (unknown fields are errors, as `kubectl apply
--validate=strict` would report), then against operator rules the CRD schema lacks (name length, replica bounds,
TTL/shutdown, serveConfigV2 through Ray Serve's ServeDeploySchema and the app's serve.config.AppArgs, ...).
Built-in kinds go through kubernetes-validate --strict. A Prometheus Operator PodMonitor (its CRD is not here) gets a
structural check of the fields the chart uses (podmonitor_errors). Every pod template must meet the "restricted" Pod Security
Standard, mount no Kubernetes API token, and KubeRay clusters must use Ray token auth
(pod_security.policy_errors). CEL rules (x-kubernetes-validations) are not evaluated.
Prints one line per object and exits 1 when any object fails (2: usage error, e.g. CRDs not found).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helm_tools import find_helm, helm, helm_template  # noqa: E402, F401  (tests use find_helm and helm from here)
from pod_security import policy_errors  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# kind -> (CRD file, longest metadata.name KubeRay accepts: 53 for a RayCluster so that "-serve-svc" still fits
# in 63, minus the 6-character suffix KubeRay appends when a RayService/RayJob makes its RayCluster)
RAY_KINDS = {"RayService": ("ray.io_rayservices.yaml", 47), "RayJob": ("ray.io_rayjobs.yaml", 47),
             "RayCluster": ("ray.io_rayclusters.yaml", 53)}
DEFAULT_K8S_VERSIONS = ("1.30.0", "1.35.0")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MTN_IMPORT_PATH = "serve.app:build_app"


class CRDsNotFound(RuntimeError):
    pass


def shared_dir() -> Path:
    return Path(os.environ.get("MTN_SHARED") or REPO_ROOT.parent / "shared")


def crd_dir() -> Path:
    return shared_dir() / "k8s" / "crds"


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# ------------------------------------------------------------------------------------------------ CRD schemas
def strict_schema(node):
    """OpenAPI v3 schema of a CRD -> JSON schema that rejects unknown fields (recursively)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = strict_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
        if node.get("x-kubernetes-embedded-resource"):  # apiVersion/kind/metadata are implied there
            for implied in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(implied, {"type": "string"} if implied != "metadata" else {"type": "object"})
    return out


@functools.cache
def crd_validator(kind: str, crds: Path | None = None) -> jsonschema.Draft7Validator:
    path = (crds or crd_dir()) / RAY_KINDS[kind][0]
    if not path.is_file():
        raise CRDsNotFound(f"KubeRay CRD not found: {path} (set $MTN_SHARED to the folder holding k8s/crds/)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1.4 MB: libyaml
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<root>"


def crd_errors(obj: dict, crds: Path | None = None) -> list[str]:
    validator = crd_validator(obj["kind"], crds)
    return [f"{_where(e)}: {e.message}" for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path))]


# ------------------------------------------------------------------------------------------------ operator rules
def _containers(template: dict | None) -> list[dict]:
    return ((template or {}).get("spec") or {}).get("containers") or []


def _container_rules(containers: list[dict], where: str) -> list[str]:
    errors = []
    for c in containers:
        res = c.get("resources") or {}
        if not (res.get("limits") or res.get("requests")):
            errors.append(f"{where}: container {c.get('name')!r} has no resources (KubeRay derives Ray's CPU/GPU/memory "
                          "from them; set limits)")
    return errors


def cluster_errors(cluster: dict, where: str) -> list[str]:
    errors = []
    head = cluster.get("headGroupSpec") or {}
    head_containers = _containers(head.get("template"))
    if not head_containers:
        errors.append(f"{where}.headGroupSpec: the pod template has no container")
    errors += _container_rules(head_containers, f"{where}.headGroupSpec")
    seen = set()
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        gwhere = f"{where}.workerGroupSpecs[{i}]"
        name = group.get("groupName")
        if name in seen:
            errors.append(f"{gwhere}: groupName {name!r} is used twice (worker group names must be unique)")
        seen.add(name)
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        if lo > hi:
            errors.append(f"{gwhere}: minReplicas ({lo}) > maxReplicas ({hi})")
        if "replicas" in group and not lo <= group["replicas"] <= hi:
            errors.append(f"{gwhere}: replicas ({group['replicas']}) is outside [minReplicas, maxReplicas] = [{lo}, {hi}]")
        containers = _containers(group.get("template"))
        if not containers:
            errors.append(f"{gwhere}: the pod template has no container")
        errors += _container_rules(containers, gwhere)
    return errors


def rayjob_errors(spec: dict) -> list[str]:
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    ttl = spec.get("ttlSecondsAfterFinished")
    if shutdown and ttl is None:
        errors.append("spec: shutdownAfterJobFinishes is true but ttlSecondsAfterFinished is not set "
                      "(say how long the finished cluster stays for debugging; 0 deletes it at once)")
    if ttl is not None and not shutdown:
        errors.append("spec: ttlSecondsAfterFinished is set but shutdownAfterJobFinishes is not true "
                      "(KubeRay rejects a TTL without shutdown)")
    if ttl is not None and ttl < 0:
        errors.append(f"spec.ttlSecondsAfterFinished: must be >= 0, got {ttl}")
    if spec.get("suspend") and not shutdown:
        errors.append("spec: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode != "InteractiveMode" and not (spec.get("entrypoint") or "").strip():
        errors.append(f"spec.entrypoint: empty (required in {mode})")
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        errors.append("spec.activeDeadlineSeconds: must be > 0")
    if spec.get("backoffLimit") is not None and spec["backoffLimit"] < 0:
        errors.append("spec.backoffLimit: must be >= 0")
    if spec.get("runtimeEnvYAML"):
        try:
            env = yaml.safe_load(spec["runtimeEnvYAML"])
            if not isinstance(env, dict):
                errors.append("spec.runtimeEnvYAML: not a YAML mapping")
        except yaml.YAMLError as e:
            errors.append(f"spec.runtimeEnvYAML: invalid YAML: {e}")
    submitter = spec.get("submitterPodTemplate")
    if submitter and mode == "SidecarMode":
        errors.append("spec: SidecarMode does not support submitterPodTemplate")
    if submitter:
        errors += _container_rules(_containers(submitter), "spec.submitterPodTemplate")
    return errors


def _gpus(container: dict) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    return float(limits.get("nvidia.com/gpu", 0))


def _pydantic_errors(exc) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]


def serve_config_errors(spec: dict, cluster: dict | None) -> list[str]:
    """serveConfigV2 must parse, pass Ray Serve's ServeDeploySchema, and the mtn app's args must pass AppArgs."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from serve.config import AppArgs

    where = "spec.serveConfigV2"
    raw = spec.get("serveConfigV2")
    if not raw:
        return [f"{where}: empty"]
    try:
        config = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        return [f"{where}: invalid YAML: {e}"]
    if not isinstance(config, dict):
        return [f"{where}: not a YAML mapping"]
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{where} (ServeDeploySchema) {m}" for m in _pydantic_errors(e)]
    errors = []
    pod_gpus = [_gpus(c) for g in (cluster or {}).get("workerGroupSpecs") or [] for c in _containers(g.get("template"))]
    for app in config.get("applications") or []:
        awhere = f"{where}: application {app.get('name')!r}"
        for dep in app.get("deployments") or []:
            if dep.get("autoscaling_config") is not None:
                dwhere = f"{awhere} deployment {dep.get('name')!r}: autoscaling_config"
                try:
                    AutoscalingConfig(**dep["autoscaling_config"])
                except ValidationError as e:
                    errors += [f"{dwhere} {m}" for m in _pydantic_errors(e)]
                except (TypeError, ValueError) as e:
                    errors.append(f"{dwhere}: {e}")
            gpus = float((dep.get("ray_actor_options") or {}).get("num_gpus") or 0)
            if gpus > max(pod_gpus, default=0):
                errors.append(f"{awhere} deployment {dep.get('name')!r}: num_gpus={gpus:g} but no worker pod has that "
                              f"many nvidia.com/gpu (largest: {max(pod_gpus, default=0):g})")
        if app.get("import_path") == MTN_IMPORT_PATH:
            try:
                AppArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                errors += [f"{awhere} args (serve.config.AppArgs) {m}" for m in _pydantic_errors(e)]
    return errors


def operator_errors(obj: dict) -> list[str]:
    kind = obj["kind"]
    name = (obj.get("metadata") or {}).get("name") or ""
    limit = RAY_KINDS[kind][1]
    errors = []
    if not name:
        errors.append("metadata.name: missing")
    elif len(name) > limit:
        errors.append(f"metadata.name: {name!r} has {len(name)} characters; KubeRay accepts at most {limit} for a {kind}")
    elif not DNS1035.match(name):
        errors.append(f"metadata.name: {name!r} is not a DNS-1035 label ([a-z]([-a-z0-9]*[a-z0-9])?)")
    spec = obj.get("spec") or {}
    if kind == "RayCluster":
        cluster, where = spec, "spec"
    elif kind == "RayService":
        cluster, where = spec.get("rayClusterConfig"), "spec.rayClusterConfig"
    else:
        cluster, where = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    if cluster:
        errors += cluster_errors(cluster, where)
    if kind == "RayJob":
        errors += rayjob_errors(spec)
    if kind == "RayService":
        strategy = (spec.get("upgradeStrategy") or {}).get("type")
        if strategy is not None and strategy not in ("NewCluster", "None", "NewClusterWithIncrementalUpgrade"):
            errors.append(f"spec.upgradeStrategy.type: {strategy!r} is not NewCluster, None or "
                          "NewClusterWithIncrementalUpgrade")
        if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
            errors.append("spec.rayClusterDeletionDelaySeconds: must be >= 0")
        errors += serve_config_errors(spec, cluster)
    return errors


# ------------------------------------------------------------------------------------------------ PodMonitor
PROM_DURATION = re.compile(r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
SELECTOR_OPS = {"In", "NotIn", "Exists", "DoesNotExist"}
SPEC_FIELDS = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
ENDPOINT_FIELDS = {"port", "portNumber", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                   "relabelings", "metricRelabelings"}


def podmonitor_errors(obj: dict) -> list[str]:
    """monitoring.coreos.com/v1 PodMonitor, structurally: a name, a label selector, endpoints with a port, an absolute
    path and Prometheus durations; unknown fields are errors (the CRD is not available offline)."""
    errors = []
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if not DNS1123.match(meta.get("name") or ""):
        errors.append(f"metadata.name: {meta.get('name')!r} is not a DNS-1123 subdomain")
    if set(spec) - SPEC_FIELDS:
        errors.append(f"spec: unknown fields {sorted(set(spec) - SPEC_FIELDS)}")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        errors.append("spec.selector: a label selector with matchLabels or matchExpressions is required (an empty one "
                      "selects every pod of the namespace)")
    else:
        errors += [f"spec.selector.matchExpressions[{i}]: needs a key and an operator in {sorted(SELECTOR_OPS)}"
                   for i, e in enumerate(selector.get("matchExpressions") or [])
                   if not isinstance(e, dict) or not e.get("key") or e.get("operator") not in SELECTOR_OPS]
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return errors + ["spec.podMetricsEndpoints: at least one endpoint is required"]
    for i, ep in enumerate(e if isinstance(e, dict) else {} for e in endpoints):
        where = f"spec.podMetricsEndpoints[{i}]"
        if set(ep) - ENDPOINT_FIELDS:
            errors.append(f"{where}: unknown fields {sorted(set(ep) - ENDPOINT_FIELDS)}")
        if not (ep.get("port") or ep.get("portNumber") or ep.get("targetPort")):
            errors.append(f"{where}: port (a container port name) is required")
        if not str(ep.get("path", "/metrics")).startswith("/"):
            errors.append(f"{where}.path: must start with /")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not PROM_DURATION.match(str(ep[key])):
                errors.append(f"{where}.{key}: {ep[key]!r} is not a Prometheus duration (e.g. 30s, 1m)")
    return errors


# ------------------------------------------------------------------------------------------------ built-in kinds
def builtin_errors(obj: dict, versions=DEFAULT_K8S_VERSIONS) -> list[str]:
    import kubernetes_validate.utils as kv

    errors = []
    for version in versions:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"kubernetes {version}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}")
        except (kv.SchemaNotFoundError, kv.VersionNotSupportedError) as e:
            errors.append(f"kubernetes {version}: {e.message}")
    return errors


def object_errors(obj: dict, versions=DEFAULT_K8S_VERSIONS, crds: Path | None = None) -> tuple[str, list[str]]:
    """(what was checked, errors) for one manifest object."""
    if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
        return "manifest", ["not a Kubernetes object (no apiVersion/kind)"]
    if obj["kind"] in RAY_KINDS and obj["apiVersion"] == "ray.io/v1":
        errors = crd_errors(obj, crds)  # operator and pod rules assume the CRD's types
        if not errors:
            errors = operator_errors(obj) + policy_errors(obj)
        return "KubeRay v1 CRD (strict) + operator rules + restricted pods", errors
    if obj["kind"] == "PodMonitor" and obj["apiVersion"] == "monitoring.coreos.com/v1":
        return "PodMonitor structure (no CRD offline)", podmonitor_errors(obj)
    errors = builtin_errors(obj, versions)
    return (f"kubernetes-validate --strict {', '.join(versions)} + restricted pods",
            errors + (policy_errors(obj) if not errors else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="manifest files ('-' = stdin)")
    p.add_argument("--chart", help="render this Helm chart with helm template and validate the output")
    p.add_argument("-f", "--values", action="append", default=[], help="values file for --chart (repeatable)")
    p.add_argument("--set", action="append", default=[], help="--set for --chart (repeatable)")
    p.add_argument("--release", default="mtn-serve", help="release name for --chart (default: %(default)s)")
    p.add_argument("-k", "--kubernetes-version", action="append", dest="versions",
                   help=f"Kubernetes version(s) for built-in kinds (default: {', '.join(DEFAULT_K8S_VERSIONS)})")
    p.add_argument("--crds", type=Path, help="folder of the KubeRay CRDs (default: $MTN_SHARED/k8s/crds)")
    args = p.parse_args(argv)
    if not args.files and not args.chart:
        p.error("give manifest files, '-', or --chart")
    sources: list[tuple[str, str]] = []
    try:
        if args.chart:
            sources.append((f"helm template {args.release} {args.chart}",
                            helm_template(args.chart, args.values, args.set, args.release)))
        for f in args.files:
            sources.append(("<stdin>", sys.stdin.read()) if f == "-" else (f, Path(f).read_text()))
    except (OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for label, text in sources:
        try:
            docs = load_docs(text)
        except yaml.YAMLError as e:
            print(f"FAIL  {label}: invalid YAML: {e}")
            failed += 1
            continue
        for obj in docs:
            name = f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}" if isinstance(obj, dict) else "?"
            try:
                checked, errors = object_errors(obj, tuple(args.versions or DEFAULT_K8S_VERSIONS), args.crds)
            except CRDsNotFound as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(f"{'FAIL' if errors else 'OK'}  {label}: {name} ({checked})")
            for err in errors:
                print(f"      - {err}")
            failed += bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
