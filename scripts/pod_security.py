"""The project's pod policy for manifests: the Kubernetes "restricted" Pod Security Standard, checked offline on
every pod template of a Deployment/StatefulSet/DaemonSet/Job and of KubeRay's RayJob/RayService/RayCluster."""

from __future__ import annotations

RAY_CLUSTER_SPEC = {"RayService": "spec.rayClusterConfig", "RayJob": "spec.rayClusterSpec", "RayCluster": "spec"}


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a Deployment/Job/RayJob/RayService/RayCluster."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    found = []
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
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
