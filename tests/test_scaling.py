"""The capacity model (scripts/capacity.py, SCALING.md) and the finetune RayJob sized from it; in-process, no I/O
beyond reading the repo's files."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]
import capacity  # noqa: E402
import capacity_deploy  # noqa: E402

from mtn.errors import MTNError  # noqa: E402

DOC = REPO / "SCALING.md"
RAYJOB = REPO / "k8s" / "rayjob-finetune-unet.yaml"
GIB = 1024**3


@pytest.fixture(scope="module")
def entries() -> dict:
    return capacity.load_entries()


@pytest.fixture(scope="module")
def inp(entries) -> dict:
    return {name: e["value"] for name, e in entries.items()}


def _rayjob() -> dict:
    (job,) = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d and d["kind"] == "RayJob"]
    return job


def _gi(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)Gi", quantity)
    assert match, f"expected a whole number of Gi, got {quantity!r}"
    return int(match.group(1))


# ------------------------------------------------------------------------------------------------ SCALING.md
def test_scaling_doc_reproduces_from_the_script(entries, tmp_path):
    assert capacity.check(DOC, entries), "SCALING.md is stale: run python scripts/capacity.py --write SCALING.md"
    changed = copy.deepcopy(entries)
    changed["disk_write_MBps"]["value"] = 2000  # another input -> another table -> the check must fail
    assert not capacity.check(DOC, changed)

    stale = tmp_path / "SCALING.md"
    stale.write_text(DOC.read_text().replace("| 1 | 8 |", "| 1 | 9 |", 1))
    assert capacity.main(["--check", str(stale)]) == 1
    assert capacity.main(["--write", str(stale)]) == 0
    assert stale.read_text() == DOC.read_text()


def test_every_input_has_a_source(tmp_path):
    bad = tmp_path / "inputs.yaml"
    bad.write_text("pairs:\n  value: 1\n  source: ''\n")
    with pytest.raises(MTNError, match="'pairs' needs a value and a source"):
        capacity.load_entries(bad)
    assert capacity.main(["--inputs", str(bad)]) == 2


def test_markers_are_required(entries, tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    with pytest.raises(MTNError, match="capacity markers"):
        capacity.check(doc, entries)


# ------------------------------------------------------------------------------------------------ by hand
def test_checkpoint_bytes_by_hand(inp):
    params = 859_520_964 + 79_210_084  # UNet + MTN, trained together
    ema = 4 * 859_520_964
    z3 = capacity.checkpoint_bytes(inp, 3, 64)
    assert z3["shard"] == 16 * params / 64  # ZeRO-3: weights + AdamW, split evenly over the ranks
    assert z3["total"] == 16 * params + ema
    z2 = capacity.checkpoint_bytes(inp, 2, 8)
    assert z2["rank0"] == 4 * params + ema + 12 * params / 8
    assert z2["node0"] == z2["total"]  # one node holds every rank
    z0 = capacity.checkpoint_bytes(inp, 0, 128)
    assert z0["shard"] == 0 and z0["rank0"] == z0["node0"] == z0["total"]


def test_throughput_and_feature_cache_by_hand(inp):
    reference = 3 * 180_106_444_800 + 13_298_503_680  # MosaicML's step: UNet training + CLIP text forward
    ours_256 = 4 * 180_106_444_800 + 188_357_148_672  # gradient checkpointing + the T5-3B forward
    assert capacity.images_per_s(inp, 256) == pytest.approx(137 * reference / ours_256)
    assert capacity.images_per_s(inp, 256) == pytest.approx(83.46, abs=0.01)
    assert capacity.gpu_days_per_epoch(inp, 256) == pytest.approx(116e6 / (83.46 * 86400), rel=1e-3)
    row = 77 * 1024 * 2 + 77 + 77 * 768 * 2 + 77 + 8  # source + mask, target + mask, index
    assert capacity.feature_cache_bytes(inp, with_source=True) == 18e6 * row


def test_nodes_for_target_picks_the_fewest_that_fit(inp):
    assert capacity.nodes_for_target(inp) == 1
    assert capacity.nodes_for_target({**inp, "target_days": 1.0}) == 4  # 2 nodes: 1.14 days, 4: 0.55
    with pytest.raises(MTNError, match="no node count"):
        capacity.nodes_for_target({**inp, "target_days": 0.01})


# ------------------------------------------------------------------------------------------------ the RayJob
def test_rayjob_is_sized_by_the_model(inp):
    from mtn.config import load_config
    from mtn.finetune_config import FinetuneConfig

    size = capacity.pod_sizing(inp)
    job = _rayjob()
    argv = job["spec"]["entrypoint"].split()
    cfg = load_config(REPO / argv[3], argv[4:], cls=FinetuneConfig)
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    res = container["resources"]
    gpus = res["limits"]["nvidia.com/gpu"]

    assert gpus == inp["gpus_per_node"] and group["replicas"] == size["nodes"]
    assert cfg.num_workers == group["replicas"] * gpus and cfg.gpus_per_worker == 1
    # CPU per GPU for decoding: the ranks' reservation plus the node overhead is the pod's CPU
    assert (cfg.loader_workers, cfg.cpus_per_worker) == (size["loader_workers"], size["cpus_per_gpu"])
    assert int(res["requests"]["cpu"]) == int(res["limits"]["cpu"]) == size["pod_cpus"]
    assert cfg.num_workers * cfg.cpus_per_worker + inp["node_overhead_cpus"] == group["replicas"] * size["pod_cpus"]
    assert _gi(res["requests"]["memory"]) == _gi(res["limits"]["memory"]) == size["memory_gib"]
    # checkpoint staging: its own emptyDir, mounted where the job stages, sized by the model
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    staging = volumes[mounts[cfg.checkpoint_staging_dir]]
    assert _gi(staging["emptyDir"]["sizeLimit"]) == size["staging_gib"]
    assert _gi(res["requests"]["ephemeral-storage"]) == sum(_gi(v["emptyDir"]["sizeLimit"]) for v in volumes.values())
    # the model's inputs that come from the job's config
    assert inp["zero_stage"] == cfg.zero_stage and inp["checkpoint_every"] == cfg.checkpoint_every
    assert inp["batch_per_gpu"] == cfg.batch_size // cfg.num_workers
    assert inp["shuffle_buffer"] == cfg.shuffle_buffer
    assert bool(inp["gradient_checkpointing"]) == cfg.gradient_checkpointing


def test_staging_holds_two_checkpoints_of_node_zero(inp):
    node0 = capacity.checkpoint_bytes(inp, 2, 8)["node0"]
    size = capacity.pod_sizing(inp)
    assert (size["staging_gib"] - 1) * GIB < 2 * node0 <= size["staging_gib"] * GIB
    assert size["staging_gib"] == 35


# ------------------------------------------------------------------------------------------------ one source of sizing
def test_config_and_rayjob_agree_with_the_model(inp, tmp_path):
    """The finetune config's sizing keys and its RayJob come from the model; a disagreement names both numbers."""
    assert capacity_deploy.deployment_errors(inp) == []
    want = capacity.deployment_sizing(inp)
    assert (want["num_workers"], want["batch_size"]) == (8, 256)  # 1 node x 8 GPUs x 32 images

    config = tmp_path / "finetune.yaml"
    text = (REPO / "jobs" / "configs" / "finetune_sd14_t5.yaml").read_text()
    config.write_text(re.sub(r"(?m)^num_workers: 8\b", "num_workers: 256", text))
    (line,) = capacity_deploy.deployment_errors(inp, config=config)
    assert "num_workers=256" in line and "says 8" in line

    job = yaml.safe_load_all(RAYJOB.read_text())
    docs = [d for d in job if d]
    (rayjob,) = [d for d in docs if d["kind"] == "RayJob"]
    rayjob["spec"]["entrypoint"] += " batch_size=2048"  # an override in the entrypoint counts as the config's
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 2
    bad = tmp_path / "rayjob.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    errors = capacity_deploy.deployment_errors(inp, rayjob=bad)
    assert any("batch_size=2048" in e and "says 256" in e for e in errors), errors
    assert any("replicas=2" in e and "1 node(s)" in e for e in errors), errors
    assert capacity.main(["--check", str(DOC), "--rayjob", str(bad)]) == 1
    assert capacity.main(["--check", str(DOC)]) == 0
