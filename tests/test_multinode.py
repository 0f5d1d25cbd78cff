"""Multi-node behaviour on one machine: a 3-node Ray cluster (a head without accelerators + 2 worker nodes with
{"A100": 2} each, on their own loopback addresses; tests/multinode.py).

- train_mtn and finetune_unet with one Ray Train worker per worker node (STRICT_SPREAD, ZeRO-2 over gloo between
  "hosts") train what the same steps train with both workers on one node (STRICT_PACK), and what the pinned
  single-host runs of tests/test_train_job.py and tests/test_finetune_job.py train;
- a sweep's trials land on different nodes;
- a worker node lost mid-run: the run waits for a replacement node, resumes from its last checkpoint, finishes;
  one MLflow run holds every step, every checkpoint written before the loss is still there.

What one machine cannot show (RELIABILITY.md, "Multi-node"): real network bandwidth/latency and NCCL over
NVLink/InfiniBand (gloo on loopback here), separate filesystems per node (all nodes share /tmp here, so a checkpoint
staged on a lost node's disk would survive; on a cluster the storage_path must be shared: s3:// or a network volume),
GPU placement and CUDA_VISIBLE_DEVICES, clock skew, and KubeRay's pod restarts (the node here comes back by test
code, on a cluster by the autoscaler or the worker group's replicas).
"""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multinode import ACCELERATOR, LocalCluster, train_workers, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

ROOT = Path(__file__).parents[1]
SPREAD = [f"worker_resources={{{ACCELERATOR}: 1}}", "placement_strategy=STRICT_SPREAD", "num_workers=2"]
PACK = [f"worker_resources={{{ACCELERATOR}: 1}}", "placement_strategy=STRICT_PACK", "num_workers=2"]


@pytest.fixture(scope="module")
def nodes():
    """The module's 3-node cluster, this process connected to it as the jobs' driver."""
    pytest.importorskip("ray")
    import ray

    if ray.is_initialized():  # a shared single-node Ray of an earlier module (tests/conftest.py)
        ray.shutdown()
    saved = os.environ.pop("RAY_ADDRESS", None)
    cluster = LocalCluster(workers=2, cpus=2, per_node=2)
    try:
        from mtn.train.cluster import init_ray

        init_ray(cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def run_placed(job, args: list[str]) -> set[str]:
    """Run job.main(args) in this process (driver on the head); -> the IPs of the nodes its train workers ran on."""
    before = train_workers()
    assert job.main(args) == 0
    return {ip for actor, ip in train_workers().items() if actor not in before}


def test_train_mtn_one_worker_per_node_trains_what_one_node_trains(nodes, tmp_path, monkeypatch):
    """ZeRO-2 over gloo between two hosts = the same on one host = the pinned one-worker run (same global batch)."""
    from jobs import train_mtn
    from mtn import load_translator
    from tests.test_train_job import EXPECTED_VAL, PINNED

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = {}
    for name, placement in (("spread", SPREAD), ("pack", PACK)):
        out = tmp_path / name
        ips = run_placed(train_mtn, [*PINNED, *placement, f"output_dir={out}", "compare_linear=false"])
        runs[name] = (ips, json.loads((out / "metrics.json").read_text()), load_translator(out / "translator"))
    assert runs["spread"][0] == {"127.0.0.2", "127.0.0.3"}  # one worker on each worker node, none on the head
    assert len(runs["pack"][0]) == 1 and runs["pack"][0] < {"127.0.0.2", "127.0.0.3"}
    for key, expected in EXPECTED_VAL.items():  # rel 1e-4: see tests/test_train_job.py (all-reduce order)
        assert runs["spread"][1][key] == pytest.approx(expected, rel=1e-4), key
        assert runs["spread"][1][key] == pytest.approx(runs["pack"][1][key], rel=1e-4), key
    text = ["a red dog runs on the beach"]
    a, b = runs["spread"][2].encode(text), runs["pack"][2].encode(text)  # [1, 77, 48]
    assert a.shape == (1, 77, 48) and (a - b).abs().max().item() < 1e-4


def test_finetune_one_worker_per_node_trains_what_one_node_trains(nodes, tmp_path, monkeypatch):
    """The UNet finetune (ZeRO-2, MTN trained jointly, EMA) across two hosts: the pinned losses of the one-host
    2-worker run, and the same UNet weights as both workers on one node."""
    import torch

    from jobs import finetune_unet
    from mtn.pipeline import load_pipeline
    from tests.test_finetune_job import LOSSES_2_WORKERS, mlflow_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = ["zero_stage=2", "max_steps=3", "val_every=3", "checkpoint_every=3", "log_every=1", "train_mtn=true",
              "mtn_lr=1e-5", "ema_decay=0.9", "snr_gamma=5.0", "noise_offset=0.05"]
    unets, placed = {}, {}
    for name, placement in (("spread", SPREAD), ("pack", PACK)):
        out = tmp_path / name
        placed[name] = run_placed(finetune_unet, [*common, *placement, f"output_dir={out}"])
        client, run = mlflow_run(out)
        losses = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert losses == pytest.approx(LOSSES_2_WORKERS, rel=1e-4), (name, losses)
        unets[name] = load_pipeline(str(out / "pipeline")).unet.state_dict()
    assert placed["spread"] == {"127.0.0.2", "127.0.0.3"} and len(placed["pack"]) == 1
    worst = max((unets["spread"][k].float() - v.float()).abs().max().item() for k, v in unets["pack"].items())
    assert worst < 1e-5 and torch.isfinite(next(iter(unets["spread"].values()))).all()


def test_sweep_trials_land_on_different_nodes(nodes, tmp_path, monkeypatch):
    """Two trials at once, each asking for a whole worker node ({A100: 2} for its one worker): one per node."""
    from jobs import sweep_mtn

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"name: mn-sweep\nbase_config: {ROOT}/jobs/configs/local.yaml\noutput_dir: {out}\n"
        f"ray_address: {nodes.address}\nnum_modules: [2, 3]\nnum_samples: 1\nearly_stop: false\nregister_model: null\n"
        "base_overrides: [max_steps=4, val_every=2, checkpoint_every=2, hidden_dim=16, corpus=generated:300, "
        f"max_val_samples=50, bundle_source_encoder=false, compare_linear=false, ray_address={nodes.address}, "
        f"'worker_resources={{{ACCELERATOR}: 2}}']\n")
    before = train_workers()
    assert sweep_mtn.main(["--config", str(config)]) == 0
    ips = sorted(ip for actor, ip in train_workers().items() if actor not in before)
    assert ips == ["127.0.0.2", "127.0.0.3"]  # 2 trials x 1 worker, one on each worker node
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"], rows


def test_node_lost_mid_run_resumes_on_a_replacement_node(nodes, tmp_path):
    """A worker node dies (raylet and processes killed) once a checkpoint is registered; the run (STRICT_SPREAD: one
    worker per node) cannot place its 2 workers on the one node left, waits, gets a new node, resumes from its last
    checkpoint and finishes. Runs as its own driver process (the job's SIGTERM handling needs the main thread)."""
    from mtn.train.resume import latest_checkpoint_state

    out, name, max_steps = tmp_path / "run", "node-loss", 20  # room for the loss to land mid-run
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, str(ROOT / "jobs" / "train_mtn.py"), *SPREAD, f"output_dir={out}", f"name={name}",
            f"ray_address={nodes.address}", f"max_steps={max_steps}", "checkpoint_every=2", "log_every=1",
            "val_every=100", "num_checkpoints_to_keep=100", "max_failures=3", "compare_linear=false",
            "precision=fp32", "loss_rec=0"]
    before = train_workers()
    with open(tmp_path / "log.txt", "w") as log_file:
        job = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            def checkpointed():
                if job.poll() is not None:
                    raise AssertionError((tmp_path / "log.txt").read_text()[-5000:])
                try:
                    return latest_checkpoint_state(str(out / "ray_results"), name)
                except ValueError:  # the snapshot caught mid-write
                    return None

            _, state = wait_until(checkpointed, 600, "the run's first checkpoint")
            lost_at = state["step"]
            saved_before = checkpoint_steps(out / "ray_results" / name)
            lost = nodes.workers[0]
            new = nodes.replace_node(lost)  # the dead node's workers fail; the new node takes their place
            job.wait(timeout=900)
        finally:
            if job.poll() is None:
                job.kill()
    log = (tmp_path / "log.txt").read_text()
    assert job.returncode == 0, log[-5000:]
    resumed = [int(s) for s in re.findall(r"resuming from the checkpoint at step (\d+)", log)]
    assert resumed and lost_at <= resumed[0] < max_steps and resumed[0] % 2 == 0, log[-5000:]
    ips = {ip for actor, ip in train_workers().items() if actor not in before}
    assert new.node_ip_address in ips  # the resumed workers ran on the replacement node

    saved_after = checkpoint_steps(out / "ray_results" / name)
    assert set(saved_before) <= set(saved_after)  # no checkpoint lost with the node
    assert sorted(saved_after) == list(range(2, max_steps + 1, 2))  # every checkpoint, whole and registered once
    # a folder the lost rank never reported (Ray Train leaves it) was removed at the end: no torn checkpoint is left
    folders = {p.name for p in (out / "ray_results" / name).glob("checkpoint_*") if p.is_dir()}
    assert len(folders) == len(saved_after), (folders, re.findall(r"removed \d+ checkpoint folder.*", log))

    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("mtn").experiment_id])  # one run across the loss
    history = client.get_metric_history(run.info.run_id, "train/loss")
    by_step: dict[int, set[float]] = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(m.value)
    assert sorted(by_step) == list(range(1, max_steps + 1))  # every step, in the one run
    # steps re-run after the resume logged the same loss again: the resume is exact (weights, optimizer, data)
    assert all(len(values) == 1 for values in by_step.values()), {s: v for s, v in by_step.items() if len(v) > 1}


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints Ray Train registered for a run (its checkpoint_manager_snapshot.json), each read
    from the checkpoint's own train_state.json. A folder a lost rank never reported (rank 0 wrote its part, the dead
    rank did not) is never registered, so never resumed from (and mtn.train.fit removes it): not counted here."""
    from mtn.train.resume import SNAPSHOT, STATE_FILE

    snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    return [json.loads((run_dir / r["checkpoint_dir_name"] / STATE_FILE).read_text())["step"]
            for r in snapshot["checkpoint_results"]]
