"""Precomputed latents: the file format, rank split, exact resume; the precompute job feeding the finetune job."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtn.data.latents import LatentBatches, check_manifest, read_manifest, write_file, write_manifest
from mtn.errors import MTNError

ROOT = Path(__file__).parents[1]


@pytest.fixture
def latents_dir(tmp_path):
    root = str(tmp_path / "lat")
    files = []
    for i, n in enumerate([5, 7, 6, 4]):
        ids = torch.arange(100 * i, 100 * i + n, dtype=torch.float32)  # a sample's id is in its mean
        write_file(root, f"{i:05d}.safetensors", {"latent_mean": ids[:, None, None, None].expand(n, 4, 2, 2).half(),
                                                  "latent_std": torch.zeros(n, 4, 2, 2).half(),
                                                  "text": torch.zeros(n, 3, 8).half()}, [f"k{j}" for j in range(n)])
        files.append({"name": f"{i:05d}.safetensors", "rows": n})
    write_manifest(root, {"pipeline": "tiny", "translator": "tiny", "resolution": 32, "text": "prompt_embeds",
                          "files": files, "rows": 22})
    return root


def ids(batches) -> list[int]:
    return [int(x) for b in batches for x in b["latent_mean"][:, 0, 0, 0].float()]


def test_ranks_split_files_and_resume_exactly(latents_dir):
    r0 = ids(LatentBatches(latents_dir, 0, 2, 3, seed=1, epoch=0, skip_batches=0))
    r1 = ids(LatentBatches(latents_dir, 1, 2, 3, seed=1, epoch=0, skip_batches=0))
    assert not set(r0) & set(r1) and len(r0) == 9 and len(r1) == 9  # files 0,2 (11 rows) / 1,3 (11 rows), 3 per batch
    assert r0 == ids(LatentBatches(latents_dir, 0, 2, 3, seed=1, epoch=0, skip_batches=0))  # deterministic
    assert r0 != ids(LatentBatches(latents_dir, 0, 2, 3, seed=1, epoch=1, skip_batches=0))  # reshuffled per epoch
    assert ids(LatentBatches(latents_dir, 0, 2, 3, seed=1, epoch=0, skip_batches=2)) == r0[6:]


def test_manifest_checks(latents_dir, tmp_path):
    m = read_manifest(latents_dir)
    check_manifest(m, "tiny", "tiny", 32, "prompt_embeds")
    with pytest.raises(MTNError, match="precomputed resolution: cache has 32, config wants 64"):
        check_manifest(m, "tiny", "tiny", 64, "prompt_embeds")
    with pytest.raises(MTNError, match="run jobs/precompute_latents.py first"):
        read_manifest(str(tmp_path / "none"))
    with pytest.raises(MTNError, match="4 files for 8 workers"):
        LatentBatches(latents_dir, 0, 8, 2, 0, 0, 0)


@pytest.mark.slow
def test_precompute_job_then_finetune_from_latents(tmp_path):
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "run"
    pre = subprocess.run([sys.executable, str(ROOT / "jobs/precompute_latents.py"), f"output_dir={out}",
                          "train_mtn=true", "precompute_workers=2"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    manifest = read_manifest(str(out / "latents"))
    assert manifest["rows"] == 256 and len(manifest["files"]) == 8 and manifest["text"] == "source"
    job = [sys.executable, str(ROOT / "jobs/finetune_unet.py"), f"output_dir={out}", f"precomputed={out}/latents",
           "num_workers=2", "max_steps=2", "val_every=2", "checkpoint_every=2"]
    ft = subprocess.run([*job, "train_mtn=true"], env=env, capture_output=True, text=True, timeout=900)
    assert ft.returncode == 0, ft.stdout[-3000:] + ft.stderr[-3000:]
    assert "== finetune_unet finished ==" in ft.stdout and (out / "pipeline" / "model_index.json").is_file()
    bad = subprocess.run(job, env=env, capture_output=True, text=True, timeout=300)  # latents made for train_mtn
    assert bad.returncode == 2 and "precomputed text: cache has 'source', config wants 'prompt_embeds'" in bad.stderr
