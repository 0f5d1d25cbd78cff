"""Precomputed latents: the file format, rank split, exact resume; the precompute job feeding the finetune job."""

import pytest
import torch

from mtn.data.latents import (
    LatentBatches,
    check_latents_manifest,
    read_latents_manifest,
    write_file,
    write_latents_manifest,
)
from mtn.errors import MTNError


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
    write_latents_manifest(root, {"pipeline": "tiny", "translator": "tiny", "resolution": 32, "text": "prompt_embeds",
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
    m = read_latents_manifest(latents_dir)
    check_latents_manifest(m, "tiny", "tiny", 32, "prompt_embeds")
    with pytest.raises(MTNError, match="precomputed resolution: cache has 32, config wants 64"):
        check_latents_manifest(m, "tiny", "tiny", 64, "prompt_embeds")
    with pytest.raises(MTNError, match="run jobs/precompute_latents.py first"):
        read_latents_manifest(str(tmp_path / "none"))
    with pytest.raises(MTNError, match="4 files for 8 workers"):
        LatentBatches(latents_dir, 0, 8, 2, 0, 0, 0)


@pytest.mark.slow
def test_precompute_job_then_finetune_from_latents(tmp_path, ray_cluster, capsys, monkeypatch):
    from jobs import finetune_unet, precompute_latents

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own sqlite store under output_dir
    out = tmp_path / "run"
    code = precompute_latents.main([f"output_dir={out}", "train_mtn=true", "precompute_workers=2"])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    manifest = read_latents_manifest(str(out / "latents"))
    assert manifest["rows"] == 256 and len(manifest["files"]) == 8 and manifest["text"] == "source"
    job = [f"output_dir={out}", f"precomputed={out}/latents", "num_workers=2", "max_steps=2", "val_every=2",
           "checkpoint_every=2"]
    code = finetune_unet.main([*job, "train_mtn=true"])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    assert "== finetune_unet finished ==" in printed.out and (out / "pipeline" / "model_index.json").is_file()
    assert finetune_unet.main(job) == 2  # latents made for train_mtn: refused before Ray's workers start
    assert "precomputed text: cache has 'source', config wants 'prompt_embeds'" in capsys.readouterr().err
