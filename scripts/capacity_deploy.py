"""The finetune's deployment against the capacity model (scripts/capacity.py, SCALING.md): the config that
k8s/rayjob-finetune-unet.yaml runs (its entrypoint's --config + key=value overrides) must hold the model's
num_workers, batch_size, cpus_per_worker, loader_workers (and the inputs the model took from it), the RayJob its
replicas, GPUs, CPUs, memory and checkpoint staging. `python scripts/capacity.py --check SCALING.md` runs this.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from capacity import REPO, deployment_sizing, pod_sizing

RAYJOB = REPO / "k8s" / "rayjob-finetune-unet.yaml"  # runs jobs/configs/finetune_sd14_t5.yaml (its --config)


def _gib(quantity) -> float | None:
    q = str(quantity)
    return float(q[:-2]) if q.endswith("Gi") and q[:-2].isdigit() else None


def deployment_errors(inp: dict, rayjob: Path = RAYJOB, config: Path | None = None) -> list[str]:
    """Where the finetune RayJob or the config it runs (its entrypoint's --config + key=value overrides; `config`
    replaces the file) differ from the model: one line each, naming both numbers. [] when they agree."""
    from mtn.config import load_config
    from mtn.finetune_config import FinetuneConfig

    docs = yaml.safe_load_all(Path(rayjob).read_text())
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayJob"]
    if len(jobs) != 1:
        return [f"{rayjob}: expected one RayJob, found {len(jobs)}"]
    argv = shlex.split(jobs[0]["spec"]["entrypoint"])  # the entrypoint runs in a shell
    if "--config" not in argv:
        return [f"{rayjob}: the entrypoint has no --config"]
    at = argv.index("--config")
    path = Path(config) if config else REPO / argv[at + 1]
    cfg = load_config(path, argv[at + 2:], cls=FinetuneConfig)
    size, want = pod_sizing(inp), deployment_sizing(inp)
    where, errors = f"{path.name} (+ the entrypoint's overrides)", []
    model = {**want, "zero_stage": inp["zero_stage"], "checkpoint_every": inp["checkpoint_every"],
             "shuffle_buffer": inp["shuffle_buffer"], "gradient_checkpointing": bool(inp["gradient_checkpointing"])}
    for key, expected in model.items():
        if getattr(cfg, key) != expected:
            errors.append(f"{where}: {key}={getattr(cfg, key)} but the capacity model (SCALING.md) says {expected}")
    groups = jobs[0]["spec"]["rayClusterSpec"].get("workerGroupSpecs") or []
    if len(groups) != 1:
        return errors + [f"{rayjob}: expected one worker group, found {len(groups)}"]
    group, job = groups[0], Path(rayjob).name
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    res = container.get("resources") or {}
    req, lim = res.get("requests") or {}, res.get("limits") or {}
    for key in ("replicas", "minReplicas", "maxReplicas"):
        if group.get(key) != size["nodes"]:
            errors.append(f"{job}: {key}={group.get(key)} but the capacity model's deployment has "
                          f"{size['nodes']} node(s)")
    checks = [("nvidia.com/gpu limit", lim.get("nvidia.com/gpu"), inp["gpus_per_node"]),
              ("cpu request", str(req.get("cpu")), str(size["pod_cpus"])),
              ("cpu limit", str(lim.get("cpu")), str(size["pod_cpus"])),
              ("memory request", _gib(req.get("memory")), size["memory_gib"]),
              ("memory limit", _gib(lim.get("memory")), size["memory_gib"])]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts") or []}
    staging = volumes.get(mounts.get(cfg.checkpoint_staging_dir or ""), {}).get("emptyDir")
    checks.append((f"checkpoint staging emptyDir at {cfg.checkpoint_staging_dir}",
                   _gib((staging or {}).get("sizeLimit")), size["staging_gib"]))
    scratch = sum(_gib(v["emptyDir"].get("sizeLimit")) or 0 for v in volumes.values() if "emptyDir" in v)
    checks.append(("ephemeral-storage request (the emptyDirs' sum)", _gib(req.get("ephemeral-storage")), scratch))
    errors += [f"{job}: {what} is {got} but the capacity model (SCALING.md) says {expected}"
               for what, got, expected in checks if got != expected]
    return errors
