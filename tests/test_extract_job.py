"""jobs/extract_features.py on Ray Data (2 encoder actors, local and s3://) and train_mtn reading its caches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
TINY = ["source_encoder=tiny:t5", "source_max_length=48", "target_encoder=tiny:clip", "corpus=generated:120",
        "val_fraction=0.2", "extract_workers=2", "cpus_per_worker=1", "extract_batch_size=16",
        "extract_shard_rows=32"]


def run(job, *overrides, cwd):
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / job), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, proc.stdout[-3000:] + proc.stderr[-3000:]


def direct_rows(pairs):
    from mtn.data.features import encode_rows
    from mtn.encoders import load_text_encoder

    source, target = load_text_encoder("tiny:t5", 48), load_text_encoder("tiny:clip", 77)
    return encode_rows(source, target, pairs, full_target=True)


@pytest.mark.slow
def test_extract_with_two_workers_then_train_from_the_cache(tmp_path, monkeypatch, capsys):
    from mtn.config import load_config
    from mtn.data import config_pairs
    from mtn.data.features import load_features

    caches = [f"feature_cache={tmp_path}/f/train", f"val_feature_cache={tmp_path}/f/val"]
    proc, log = run("extract_features.py", *TINY, *caches, cwd=tmp_path)
    assert proc.returncode == 0, log
    assert "== extract_features finished ==" in proc.stdout
    manifest = json.loads((tmp_path / "f" / "train" / "manifest.json").read_text())
    assert manifest["num_rows"] == 96 and len(manifest["shards"]) >= 3  # 96 rows / 32 per shard
    assert manifest["source_encoder"]["name_or_path"] == "tiny:t5" and manifest["corpus"]["num_pairs"] == 96

    # the cache equals a direct forward of the same pairs, in corpus order, within fp16 tolerance
    train_pairs, val_pairs = config_pairs(load_config(None, [o for o in TINY if not o.startswith("extract")]))
    for split, pairs in (("train", train_pairs), ("val", val_pairs)):
        got, want = load_features(str(tmp_path / "f" / split)), direct_rows(pairs)
        assert torch.equal(got["target_mask"].long(), want["target_mask"])
        torch.testing.assert_close(got["target"].float(), want["target"], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got["source"].float(), want["source"], rtol=2e-3, atol=2e-3)

    # train_mtn on the cache (2 workers, ZeRO-2, M = fixed ridge map + mixer residual): no encoder is loaded,
    # the linear baseline's margin is reported
    out = tmp_path / "run"
    proc, log = run("train_mtn.py", *TINY, *caches, f"output_dir={out}", "max_steps=3", "batch_size=8",
                    "hidden_dim=16", "linear_skip=true", "num_workers=2", "zero_stage=2", cwd=tmp_path)
    assert proc.returncode == 0, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"val/token_mse", "val/linear_token_mse", "val/margin_token_mse_pct"} <= set(metrics)
    from mtn import load_translator

    tr = load_translator(out / "translator")
    assert tr.mtn.config.linear_skip and tr.encode(["a red car"]).shape == (1, 77, 48)

    # method=linear through the same job: a translator holding the closed-form map
    proc, log = run("train_mtn.py", *TINY, *caches, f"output_dir={tmp_path}/lin", "method=linear", cwd=tmp_path)
    assert proc.returncode == 0, log
    tr = load_translator(tmp_path / "lin" / "translator")
    assert type(tr.mtn).__name__ == "LinearTranslationMap" and tr.encode(["a dog"]).shape == (1, 77, 48)

    # a cache from other settings is refused before Ray starts (in-process: nothing may reach fit's Ray session),
    # naming what differs
    from jobs import train_mtn

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mtn.train.fit.ray_session", lambda *a, **kw: pytest.fail("Ray started"))
    capsys.readouterr()
    assert train_mtn.main([*TINY, *caches, "source_max_length=40"]) == 2
    err = capsys.readouterr().err
    assert "source_encoder.max_length: cache has 48, config wants 40" in err and "Traceback" not in err


@pytest.mark.slow
def test_extract_to_s3(tmp_path, s3_endpoint):
    import boto3

    from mtn.data.features import load_features

    boto3.client("s3").create_bucket(Bucket="features")
    proc, log = run("extract_features.py", *TINY, "feature_cache=s3://features/tiny/train", cwd=tmp_path)
    assert proc.returncode == 0, log
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="features")["Contents"]]
    assert "tiny/train/manifest.json" in keys and any(k.endswith(".safetensors") for k in keys)
    manifest = json.loads(boto3.client("s3").get_object(Bucket="features", Key="tiny/train/manifest.json")["Body"].read())
    assert all(s["file"].startswith("gen-") and len(s["sha256"]) == 64 for s in manifest["shards"])  # checksummed
    assert {k for k in keys if k.endswith(".safetensors")} == {f"tiny/train/{s['file']}" for s in manifest["shards"]}
    rows = load_features("s3://features/tiny/train")
    assert rows["source"].shape == (96, 48, 32) and rows["target"].shape == (96, 77, 48)
