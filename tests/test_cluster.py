"""The one Ray start-up path (mtn/train/cluster.py) and the environment the jobs' workers and a sweep's trials see:
DeepSpeed is pinned to its CPU accelerator only when no GPU is used."""

from pathlib import Path

import pytest

from mtn.train.cluster import init_kwargs, local_cpus, ray_session, worker_env


def test_worker_env_pins_deepspeed_to_the_cpu_only_without_gpus():
    assert worker_env(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in worker_env(use_gpu=True)
    assert worker_env(False, {"DS_ACCELERATOR": "xpu", "X": "1"})["DS_ACCELERATOR"] == "xpu"  # callers may override


def test_init_kwargs_local_cluster_or_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = init_kwargs(num_cpus=3, use_gpu=False, include_dashboard=False)
    assert local["address"] is None and local["num_cpus"] == 3 and local["include_dashboard"] is False
    assert local["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    # a running cluster has its own CPUs: num_cpus is not passed (ray.init refuses it when connecting)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    remote = init_kwargs(num_cpus=3, use_gpu=True, runtime_env={"env_vars": {"A": "b"}, "pip": ["x"]})
    assert remote["address"] == "ray://head:10001" and "num_cpus" not in remote
    assert remote["runtime_env"]["pip"] == ["x"] and remote["runtime_env"]["env_vars"]["A"] == "b"
    assert "DS_ACCELERATOR" not in remote["runtime_env"]["env_vars"]
    assert init_kwargs("10.0.0.1:6379")["address"] == "10.0.0.1:6379"  # the config's ray_address wins
    assert local_cpus(10**6) == 10**6 and local_cpus(1) >= 1


@pytest.mark.parametrize("use_gpu", [False, True])
def test_a_sweep_trial_sees_deepspeed_on_cpu_only_without_gpus(use_gpu, monkeypatch):
    """The sweep's Ray (its trials' job env) and each trial's TorchTrainer workers (RunConfig.worker_runtime_env)."""
    from jobs import sweep_mtn
    from mtn.config import load_config
    from mtn.sweep import SweepConfig
    from mtn.train.fit import run_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = load_config(Path(__file__).parents[1] / "jobs/configs/local.yaml", [f"use_gpu={str(use_gpu).lower()}"])
    options = sweep_mtn.ray_options(SweepConfig(), {"": base.to_dict()})
    job_env = init_kwargs(**options)["runtime_env"]["env_vars"]
    trainer_env = run_config(base).worker_runtime_env["env_vars"]
    for env in (job_env, trainer_env):
        assert env.get("DS_ACCELERATOR") == (None if use_gpu else "cpu")


def test_ray_workers_see_the_env_and_a_running_ray_is_left_running(ray_cluster):
    """On the session's shared Ray (conftest.ray_cluster; run alone, a Ray of its own): a worker started with a
    job's env sees it; ray_session joins a running Ray and only shuts down a Ray it started."""
    import ray

    @ray.remote(num_cpus=0)
    def seen() -> str | None:
        import os

        return os.environ.get("DS_ACCELERATOR")

    with ray_session(num_cpus=1, use_gpu=True, include_dashboard=False) as started:
        with ray_session() as again:
            assert again is False
        assert ray.is_initialized()
        assert ray.get(seen.options(runtime_env={"env_vars": worker_env(False)}).remote()) == "cpu"
        if started:  # a GPU job's own Ray: nothing pins DeepSpeed. (The shared test Ray is a CPU job's: Ray merges a
            # worker's env_vars into its job's, so there every worker sees DS_ACCELERATOR=cpu.)
            assert ray.get(seen.remote()) is None
            assert ray.get(seen.options(runtime_env={"env_vars": worker_env(True)}).remote()) is None
    assert ray.is_initialized() is not started
