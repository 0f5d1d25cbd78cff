"""Data integrity: feature-cache checksums (a corrupted shard is refused, format-1 caches load with a warning), the
extraction swap (a failed re-extraction leaves the old cache valid), and the streaming reader failing a run that
loses too many shards (missing ones, and the S3 endpoint dying mid-stream)."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from s3_faults import DyingEndpoint, upstream_of

from mtn.config import load_config
from mtn.data.features import (
    FORMAT,
    load_features,
    prune_cache,
    verify_shards,
    write_feature_manifest,
    write_shard,
)
from mtn.data.loader import make_loader
from mtn.data.shards import ShardStream, StreamConfig, list_shards
from mtn.errors import MTNError
from mtn.tiny.shards import write_tiny_shards

ROOT = Path(__file__).parents[1]
DIMS = {"source_len": 6, "target_len": 5, "source_dim": 4, "target_dim": 3}
RECORD = {"source_encoder": {"name_or_path": "s"}, "target_encoder": {"name_or_path": "t"},
          "corpus": {"files": [], "num_pairs": 20, "sha256": "x"}}


def rows(lo: int, hi: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + lo)
    n = hi - lo
    return {"index": torch.arange(lo, hi), "source": torch.randn(n, 6, 4, generator=g),
            "source_mask": torch.ones(n, 6, dtype=torch.long), "target": torch.randn(n, 5, 3, generator=g),
            "target_mask": torch.ones(n, 5, dtype=torch.long)}


def write_cache(url: str, seed: int = 0, generation: str = "gen-a") -> dict:
    shards = [write_shard(url, rows(lo, lo + 10, seed), torch.float16, generation=generation) for lo in (0, 10)]
    return write_feature_manifest(url, RECORD, shards, DIMS, "float16")


def test_a_corrupted_shard_is_refused_naming_it_and_how_to_rebuild(tmp_path):
    url = str(tmp_path / "c")
    manifest = write_cache(url)
    good = load_features(url)
    shard = tmp_path / "c" / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # one bit of one fp16 value: safetensors itself would load it without complaint
    shard.write_bytes(bytes(data))
    for read in (load_features, verify_shards):
        with pytest.raises(MTNError, match=r"shard gen-a/shard-00000010.safetensors is corrupted \(sha256 .*"
                                           r"rebuild it with `python jobs/extract_features.py --config"):
            read(url)
    data[-7] ^= 0x01
    shard.write_bytes(bytes(data))
    assert torch.equal(load_features(url)["source"], good["source"])


def test_format_1_cache_without_checksums_loads_with_a_warning(tmp_path, caplog):
    """Decision: an old cache (shards at the top level, no sha256) stays usable (re-extracting can cost hours),
    with a warning that corruption cannot be detected there; re-extraction replaces and prunes it."""
    url = str(tmp_path / "old")
    shards = []
    for lo in (0, 10):
        entry = write_shard(url, rows(lo, lo + 10), torch.float16, generation="tmp")
        (tmp_path / "old" / entry["file"]).rename(tmp_path / "old" / entry["file"].split("/")[1])
        shards.append({"file": entry["file"].split("/")[1], "rows": entry["rows"]})
    (tmp_path / "old" / "tmp").rmdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(
        {"format": FORMAT, "version": 1, **RECORD, "dtype": "float16", **DIMS, "num_rows": 20, "shards": shards}))
    with caplog.at_level(logging.WARNING, logger="mtn.data"):
        got = load_features(url)
    assert got["source"].shape == (20, 6, 4)
    assert "2 of 2 shards have no checksum (format version 1)" in caplog.text and "--force" in caplog.text
    new = write_cache(url, seed=1, generation="gen-b")  # a re-extraction into the same folder
    assert sorted(prune_cache(url, new)) == ["shard-00000000.safetensors", "shard-00000010.safetensors"]
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["gen-b", "manifest.json"]
    assert torch.equal(load_features(url)["source"], torch.cat([rows(0, 10, 1)["source"],
                                                               rows(10, 20, 1)["source"]]).half())


def test_s3_cache_swap_prune_and_corruption(s3_endpoint):
    """The same on S3 (no renames there): the manifest PUT is the swap, old generations are deleted after it."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="integrity")  # its own bucket: the S3 server is shared by the session
    url = "s3://integrity/c"
    write_cache(url, seed=0, generation="gen-a")
    new = [write_shard(url, rows(lo, lo + 10, 1), torch.float16, generation="gen-b") for lo in (0, 10)]
    assert torch.equal(load_features(url)["source"], torch.cat([rows(0, 10)["source"], rows(10, 20)["source"]]).half())
    manifest = write_feature_manifest(url, RECORD, new, DIMS, "float16")
    assert prune_cache(url, manifest) == ["gen-a"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="integrity")["Contents"])
    assert keys == ["c/gen-b/shard-00000000.safetensors", "c/gen-b/shard-00000010.safetensors", "c/manifest.json"]
    key = "c/gen-b/shard-00000010.safetensors"
    data = bytearray(s3.get_object(Bucket="integrity", Key=key)["Body"].read())
    data[100] ^= 0xFF
    s3.put_object(Bucket="integrity", Key=key, Body=bytes(data))
    with pytest.raises(MTNError, match="shard gen-b/shard-00000010.safetensors is corrupted"):
        load_features(url)


def extract_job():
    spec = importlib.util.spec_from_file_location("extract_features_job", ROOT / "jobs" / "extract_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_re_extraction_leaves_the_old_cache_valid(tmp_path, monkeypatch):
    """jobs/extract_features.extract with its Ray pipeline replaced by the real shard writer over fixed rows:
    the old cache is untouched until the new manifest lands, then its shards go."""
    job = extract_job()
    cfg = load_config(None, {"corpus": "generated:20", "source_max_length": 6, "target_max_length": 5})
    url = str(tmp_path / "c")
    old = write_cache(url)
    before = load_features(url)

    def pipeline(fail_after: int | None):
        def encode_and_write(cfg, pairs, url, generation):
            out = []
            for i, lo in enumerate((0, 10)):
                if i == fail_after:
                    raise RuntimeError("an encoder actor died")
                batch = {k: v.numpy() for k, v in rows(lo, lo + 10, seed=7).items()}
                out.append({k: v[0] for k, v in job.write_shards(batch, url, cfg.feature_dtype, False,
                                                                  generation).items()})
            return out
        return encode_and_write

    pairs = [("a", "b")] * 20
    monkeypatch.setattr(job, "encode_and_write", pipeline(fail_after=1))  # one new shard written, then a crash
    with pytest.raises(RuntimeError, match="actor died"):
        job.extract(cfg, pairs, url, RECORD)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == old
    assert torch.equal(load_features(url)["target"], before["target"])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["gen-a", "manifest.json"]  # no leftovers

    monkeypatch.setattr(job, "encode_and_write", pipeline(fail_after=None))
    new = job.extract(cfg, pairs, url, RECORD)
    assert new["num_rows"] == 20 and all(len(s["sha256"]) == 64 for s in new["shards"])
    assert not (tmp_path / "c" / "gen-a").exists()  # the old generation is pruned once the new one is in place
    assert torch.equal(load_features(url)["target"], torch.cat([rows(0, 10, 7)["target"],
                                                               rows(10, 20, 7)["target"]]).half())
    # a cache matching the config but failing its checksums is not "up to date": rerunning the job repairs it
    assert job.up_to_date(url, RECORD, cfg)
    shard = tmp_path / "c" / new["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3] + b"xyz")
    assert not job.up_to_date(url, RECORD, cfg)


# ----------------------------------------------------------------------------------------------- streaming
@pytest.fixture(scope="module")
def ten_shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), num_shards=10, per_shard=6, size=24)


def test_streaming_fails_past_the_skipped_shard_fraction(ten_shards, tmp_path):
    urls = ten_shards[:9] + [str(tmp_path / "gone.tar")]  # 1 of 10 shards unreadable
    lenient = StreamConfig(resolution=16, shuffle_buffer=4, max_skipped_shard_fraction=0.1)
    stream = ShardStream(urls, lenient, batch_size=2)
    assert len(list(stream)) == 54 and stream.stats()["failed_shards"] == 1  # 1 <= 10% of 10: counted, goes on
    strict = StreamConfig(resolution=16, shuffle_buffer=4)  # default 0.05
    with pytest.raises(MTNError, match=r"1 of the 10 shards of rank 0 lane 0 could not be read completely, over "
                                       r"max_skipped_shard_fraction=0.05 \(latest: failed .*gone.tar"):
        list(ShardStream(urls, strict, batch_size=2))
    # through two DataLoader workers: the same one-line error in the main process, no worker traceback
    loader = make_loader(ShardStream(urls, strict, batch_size=2), 2, num_workers=2)
    with pytest.raises(MTNError) as err:
        list(loader)
    assert "could not be read completely" in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(MTNError, match=r"max_skipped_shard_fraction must be in \[0, 1\]"):
        StreamConfig(max_skipped_shard_fraction=1.5)


def test_s3_endpoint_dying_mid_stream_fails_the_run(s3_endpoint, ten_shards, monkeypatch):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="laion")
    for url in ten_shards:
        s3.put_object(Bucket="laion", Key=url.rsplit("/", 1)[1], Body=Path(url).read_bytes())
    proxy = DyingEndpoint(upstream_of(s3_endpoint))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries of a refused connection only cost time here
    urls = list_shards("s3://laion/")
    cfg = StreamConfig(resolution=16, shuffle_buffer=1, prefetch_samples=1, read_block_size=4096, open_retries=0)
    stream = ShardStream(urls, cfg, batch_size=2)
    seen = []
    with pytest.raises(MTNError, match=r"of the 10 shards of rank 0 lane 0 could not be read completely.*"
                                       r"s3://laion/.*check the storage \(an S3 outage\?\)"):
        for sample in stream:
            seen.append(sample["key"])
            if len(seen) == 1:
                proxy.kill()  # S3 goes away with most of the epoch unread
    assert 1 <= len(seen) < 60 and stream.stats()["failed_shards"] + stream.stats()["truncated_shards"] == 1
