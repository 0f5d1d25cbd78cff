"""The project's pod policy for manifests, checked offline (policy_errors): the Kubernetes "restricted" Pod Security
Standard on every Pod (a `helm test` hook) and pod template of a Deployment/StatefulSet/DaemonSet/Job and of KubeRay's
RayJob/RayService/RayCluster, no Kubernetes API token in any pod (api_token_errors), and Ray token auth on every KubeRay
cluster (ray_auth_errors)."""

from __future__ import annotations

RAY_CLUSTER_SPEC = {"RayService": "spec.rayClusterConfig", "RayJob": "spec.rayClusterSpec", "RayCluster": "spec"}


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of a Pod, or of every pod template in a Deployment/Job/RayJob/RayService/RayCluster."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    found = []
    if kind == "Pod":
        found.append(("spec", spec))
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        found.append(("spec.template", (spec.get("template") or {}).get("spec")))
    elif kind in RAY_CLUSTER_SPEC:
        where = RAY_CLUSTER_SPEC[kind]
        cluster = (spec if kind == "RayCluster" else spec.get(where.split(".")[1])) or {}
        found.append((f"{where}.headGroupSpec.template", ((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec")))
        for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
            found.append((f"{where}.workerGroupSpecs[{i}].template", (g.get("template") or {}).get("spec")))
        if spec.get("submitterPodTemplate"):
            found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"].get("spec")))
    return [(w, s) for w, s in found if s]


def restricted_errors(obj: dict) -> list[str]:
    """The project's pod policy: the Kubernetes "restricted" Pod Security Standard (non-root, no privilege escalation,
    all capabilities dropped, RuntimeDefault/Localhost seccomp, no host namespaces or hostPath volumes)."""
    errors = []
    for where, pod in pod_specs(obj):
        psc = pod.get("securityContext") or {}
        if any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")):
            errors.append(f"{where}: host namespaces are not allowed")
        if any("hostPath" in (v or {}) for v in pod.get("volumes") or []):
            errors.append(f"{where}: hostPath volumes are not allowed")
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            csc = c.get("securityContext") or {}
            cwhere = f"{where} container {c.get('name')!r}"
            if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
                errors.append(f"{cwhere}: runAsNonRoot must be true (pod or container securityContext)")
            if csc.get("runAsUser", psc.get("runAsUser")) == 0:
                errors.append(f"{cwhere}: runAsUser must not be 0")
            if csc.get("privileged"):
                errors.append(f"{cwhere}: privileged containers are not allowed")
            if csc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{cwhere}: allowPrivilegeEscalation must be false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                errors.append(f"{cwhere}: capabilities.drop must include ALL")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                errors.append(f"{cwhere}: seccompProfile.type must be RuntimeDefault or Localhost (pod or container)")
    return errors


# ------------------------------------------------------------------------------------------------ cluster security
API_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
MIN_TOKEN_AUTH_RAY = (2, 52, 0)  # KubeRay refuses authOptions.mode=token below this rayVersion


def _ray_cluster(obj: dict) -> dict | None:
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind not in RAY_CLUSTER_SPEC:
        return None
    return spec if kind == "RayCluster" else spec.get(RAY_CLUSTER_SPEC[kind].split(".")[1])


def api_token_errors(obj: dict) -> list[str]:
    """No pod here talks to the Kubernetes API, so none mounts a token: automountServiceAccountToken is false on every
    ServiceAccount and pod template. The one exception, KubeRay's autoscaler sidecar, must get a projected token of
    its own through autoscalerOptions.volumeMounts (else in-tree autoscaling cannot work)."""
    if obj.get("kind") == "ServiceAccount":
        if obj.get("automountServiceAccountToken") is not False:
            return ["automountServiceAccountToken must be false (pods that need the API mount a projected token)"]
        return []
    errors = [f"{where}: automountServiceAccountToken must be false (no container here needs the Kubernetes API)"
              for where, pod in pod_specs(obj) if pod.get("automountServiceAccountToken") is not False]
    cluster = _ray_cluster(obj)
    if cluster and cluster.get("enableInTreeAutoscaling"):
        head = ((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        projected = {v.get("name") for v in head.get("volumes") or []
                     if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources") or [])}
        mounts = (cluster.get("autoscalerOptions") or {}).get("volumeMounts") or []
        if head.get("automountServiceAccountToken") is False and not any(
                m.get("mountPath") == API_TOKEN_PATH and m.get("name") in projected for m in mounts):
            errors.append(f"{RAY_CLUSTER_SPEC[obj['kind']]}.autoscalerOptions.volumeMounts: the autoscaler needs a "
                          f"projected serviceAccountToken volume of the head pod mounted at {API_TOKEN_PATH}")
    return errors


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(text).split(".")[:3])
    except ValueError:
        return ()


def ray_auth_errors(obj: dict) -> list[str]:
    """Ray token auth on every KubeRay cluster (authOptions.mode: token, as KubeRay v1.7 checks it), and no container
    env that overrides what KubeRay injects (RAY_AUTH_MODE other than token, an inline RAY_AUTH_TOKEN)."""
    cluster = _ray_cluster(obj)
    if cluster is None:
        return []
    where = f"{RAY_CLUSTER_SPEC[obj['kind']]}.authOptions"
    auth = cluster.get("authOptions") or {}
    errors = []
    if auth.get("mode") != "token":
        errors.append(f"{where}.mode must be token: without Ray token auth any pod that reaches the head can submit "
                      "jobs and run code with the workers' rights")
    elif _version(cluster.get("rayVersion", "")) < MIN_TOKEN_AUTH_RAY:
        errors.append(f"{where}: token auth needs rayVersion >= 2.52.0, got {cluster.get('rayVersion')!r}")
    if auth.get("enableK8sTokenAuth"):
        if obj["kind"] != "RayCluster":
            errors.append(f"{where}.enableK8sTokenAuth: KubeRay supports it on a standalone RayCluster only")
        if auth.get("secretName"):
            errors.append(f"{where}: enableK8sTokenAuth and secretName cannot both be set")
    for pwhere, pod in pod_specs(obj):
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            for env in c.get("env") or []:
                if env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token":
                    errors.append(f"{pwhere} container {c.get('name')!r}: RAY_AUTH_MODE={env.get('value')!r} "
                                  "turns Ray token auth off (KubeRay sets it to token)")
                if env.get("name") == "RAY_AUTH_TOKEN" and "value" in env:
                    errors.append(f"{pwhere} container {c.get('name')!r}: RAY_AUTH_TOKEN is inline; KubeRay injects "
                                  "it from the token Secret")
    return errors


def policy_errors(obj: dict) -> list[str]:
    """Every project rule for one object: restricted pods, no API tokens, Ray token auth."""
    return restricted_errors(obj) + api_token_errors(obj) + ray_auth_errors(obj)


def selector_matches(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes LabelSelector (matchLabels, matchExpressions) selects these labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True
