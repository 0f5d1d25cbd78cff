"""The one way this project starts (or joins) Ray, with the environment its workers get.

Where: `address` (a config's ray_address), else $RAY_ADDRESS, else a new local cluster of `num_cpus` logical CPUs
(Ray's default, os.cpu_count(), when None). Already connected (a sweep's trial, a test session's shared cluster):
nothing is started and nothing is shut down afterwards; `ray_session` shuts down only a Ray it started.

What workers see (`worker_env`): DS_ACCELERATOR=cpu when the job uses no GPU, so DeepSpeed does not probe for CUDA
and picks its CPU accelerator (gloo); with GPUs it is left unset and DeepSpeed detects the accelerator. Ray Train
workers also get them through RunConfig(worker_runtime_env=...) (mtn/train/fit.py), from their own job's use_gpu.
Ray merges a worker's env_vars into its job's, so a variable cannot be unset for a worker: a job that uses GPUs
must start (or join) Ray with use_gpu=True.
"""

from __future__ import annotations

import contextlib
import os


def worker_env(use_gpu: bool, env: dict | None = None) -> dict[str, str]:
    """The environment variables of a job's Ray workers; `env` adds or overrides."""
    base = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}  # Train V2 is the default in ray 2.60: nothing to migrate
    if not use_gpu:
        base["DS_ACCELERATOR"] = "cpu"
    return {**base, **(env or {})}


def local_cpus(need: int = 1) -> int:
    """Logical CPUs for a local cluster: the machine's, or `need` when a job asks for more (Ray then oversubscribes
    rather than waiting forever for workers that do not fit)."""
    return max(os.cpu_count() or 1, need)


def init_kwargs(address: str | None = None, num_cpus: int | None = None, use_gpu: bool = False,
                env: dict | None = None, **kw) -> dict:
    """The ray.init keyword arguments init_ray uses (split out so that tests can check them without Ray)."""
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = dict(kw.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**worker_env(use_gpu, env), **runtime_env.get("env_vars", {})}
    local = {} if address or num_cpus is None else {"num_cpus": num_cpus}  # a running cluster has its own CPUs
    return {"address": address, "runtime_env": runtime_env, **local, **kw}


def init_ray(address: str | None = None, num_cpus: int | None = None, use_gpu: bool = False,
             env: dict | None = None, **kw) -> bool:
    """Start or join Ray unless this process already is connected; -> True when this call connected (the caller
    then owns the ray.shutdown()). `kw` goes to ray.init (include_dashboard, log_to_driver, logging_level, ...)."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(**init_kwargs(address, num_cpus, use_gpu, env, **kw))
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, use_gpu: bool = False,
                env: dict | None = None, **kw):
    """init_ray(...) for a block: shuts Ray down at the end only when this block started it. Yields whether it did."""
    import ray

    started = init_ray(address, num_cpus, use_gpu, env, **kw)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
