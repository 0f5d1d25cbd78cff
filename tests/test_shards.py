"""mtn.data.shards: streaming webdataset shards (local and S3 on loopback) into DataLoader workers."""

import io
import json
import logging
import tarfile

import pytest
import torch
from PIL import Image

from mtn.data import shards as shards_mod
from mtn.data.imageproc import decode_image, train_transform
from mtn.data.loader import make_loader
from mtn.data.shards import ShardStream, StreamConfig, list_shards
from mtn.errors import MTNError
from mtn.tiny.shards import write_tiny_shards

CFG = StreamConfig(resolution=16, shuffle_buffer=8)
LENIENT = StreamConfig(resolution=16, shuffle_buffer=8, max_skipped_shard_fraction=1.0)  # count bad shards, never fail


def all_keys(urls, skip=()):
    keys = []
    for url in urls:
        with tarfile.open(url) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return [k for k in keys if k not in skip]


def stream_keys(stream, num_workers):
    """Every sample of one stream, through a plain DataLoader (one sample per item)."""
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [x["key"] for x in loader]


def loader_batches(urls, k=0, num_workers=2, epoch=0, seed=0, batch=4, cfg=None, **kw):
    cfg = cfg or StreamConfig(resolution=16, shuffle_buffer=8, seed=seed)
    loader = make_loader(ShardStream(urls, cfg, epoch=epoch, skip_batches=k, batch_size=batch, **kw), batch,
                         num_workers=num_workers)
    return [tuple(b["keys"]) for b in loader], loader


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), num_shards=8, per_shard=10, size=24)


@pytest.fixture
def s3_shards(s3_endpoint, local_shards):
    """The same shards uploaded with boto3 to s3://bucket/laion/ on the loopback S3 server."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bucket")
    for url in local_shards:
        with open(url, "rb") as f:
            s3.put_object(Bucket="bucket", Key=f"laion/{url.rsplit('/', 1)[1]}", Body=f.read())
    return list_shards("s3://bucket/laion/")


# ----------------------------------------------------------------------------------------------- splitting
def check_split(urls, expected, world=2, workers=2):
    seen = []
    for rank in range(world):
        seen += stream_keys(ShardStream(urls, CFG, rank=rank, world_size=world, batch_size=3), workers)
    assert len(seen) == len(set(seen)), "a sample came twice"
    assert sorted(seen) == sorted(expected), "a sample was dropped"


def test_two_ranks_two_workers_no_duplicates_no_drops_local(local_shards):
    check_split(local_shards, all_keys(local_shards))


def test_two_ranks_two_workers_no_duplicates_no_drops_s3(s3_shards, local_shards):
    assert len(s3_shards) == 8 and all(u.startswith("s3://bucket/laion/") for u in s3_shards)
    check_split(s3_shards, all_keys(local_shards))


def test_fewer_shards_than_ranks_x_workers_split_by_sample(local_shards):
    check_split(local_shards[:3], all_keys(local_shards[:3]))  # 3 shards, 2 ranks x 2 workers
    check_split(local_shards[:1], all_keys(local_shards[:1]), world=3)


def test_loader_batches_cover_the_epoch_once(local_shards):
    seen, tails = [], 0
    for rank in range(2):
        batches, loader = loader_batches(local_shards, rank=rank, world_size=2)
        assert all(len(b) == 4 for b in batches)
        seen += [k for b in batches for k in b]
        tails += loader.totals["dropped_tail"]
    assert len(seen) == len(set(seen))
    assert len(seen) + tails == len(all_keys(local_shards)) and tails <= 2 * 2 * 3  # < one batch per lane


def test_loader_without_drop_last_delivers_every_sample(local_shards, tmp_path):
    urls = write_tiny_shards(tmp_path, num_shards=3, per_shard=7, size=24, corrupt=1)
    keys, sizes = [], []
    for rank in range(2):
        loader = make_loader(ShardStream(urls, CFG, rank=rank, world_size=2), 4, num_workers=2, drop_last=False)
        batches = list(loader)
        keys += [k for b in batches for k in b["keys"]]
        sizes += [len(b["keys"]) for b in batches]
        assert [b["batch_index"] for b in batches] == list(range(len(batches)))
        assert loader.totals["dropped_tail"] == 0 and loader.totals["skipped_corrupt"] <= 1
    assert set(keys) < set(all_keys(urls)) and len(keys) == len(set(keys)) == 20  # 21 samples, one corrupt
    assert max(sizes) == 4 and min(sizes) < 4


# ----------------------------------------------------------------------------------------------- order
def test_order_is_deterministic_per_seed_and_epoch(local_shards):
    first, _ = loader_batches(local_shards)
    assert loader_batches(local_shards)[0] == first
    assert loader_batches(local_shards, num_workers=0, cfg=StreamConfig(resolution=16, shuffle_buffer=8, lanes=2))[0] == first
    other_epoch, _ = loader_batches(local_shards, epoch=1)
    assert other_epoch != first and len(other_epoch) == len(first)
    assert loader_batches(local_shards, seed=1)[0] != first


# ----------------------------------------------------------------------------------------------- resume
def test_resume_with_skip_batches_is_exact_with_two_workers(tmp_path):
    # 5 shards over 2 lanes (3 vs 2 shards) and some bad samples: lanes end at different rounds
    urls = write_tiny_shards(tmp_path, num_shards=5, per_shard=12, size=24, corrupt=4, missing_caption=3)
    full, loader = loader_batches(urls, epoch=3)
    assert len(full) >= 10 and loader.totals["skipped_corrupt"] == 4
    for k in range(len(full) + 1):
        rest, resumed = loader_batches(urls, k=k, epoch=3)
        assert rest == full[k:], f"resume after {k} batches"
        assert resumed.totals["resume_skipped"] == 4 * k and resumed.totals["samples"] == 4 * (len(full) - k)


def test_resume_skips_without_transforming(tmp_path, monkeypatch):
    urls = write_tiny_shards(tmp_path, num_shards=4, per_shard=12, size=24)
    cfg = StreamConfig(resolution=16, shuffle_buffer=8, lanes=2)
    full, _ = loader_batches(urls, num_workers=0, cfg=cfg)
    calls = []
    monkeypatch.setattr(shards_mod, "train_transform", lambda *a, **kw: calls.append(1) or train_transform(*a, **kw))
    k = len(full) // 2
    rest, loader = loader_batches(urls, k=k, num_workers=0, cfg=cfg)
    assert rest == full[k:]
    assert len(calls) == 4 * (len(full) - k)  # the k skipped batches were decoded to check them, never transformed
    assert loader.totals["resume_skipped"] == 4 * k


def test_direct_iteration_resumes_too(local_shards):
    stream = ShardStream(local_shards, StreamConfig(resolution=16, shuffle_buffer=8, lanes=3), batch_size=4)
    keys = [x["key"] for x in stream]
    resumed = ShardStream(local_shards, stream.cfg, batch_size=4, skip_batches=5)
    assert [x["key"] for x in resumed] == keys[5 * 4:]


def test_resume_needs_make_loader_with_workers(local_shards, monkeypatch):
    # as inside worker 0 of 2 of a plain DataLoader (a real one would take 10 s to reap its failed workers)
    monkeypatch.setattr(shards_mod, "get_worker_info", lambda: type("Info", (), {"id": 0, "num_workers": 2}))
    with pytest.raises(MTNError, match="make_loader"):
        next(iter(ShardStream(local_shards, CFG, skip_batches=2, batch_size=4)))
    with pytest.raises(MTNError, match="batch_size"):
        make_loader(ShardStream(local_shards, CFG, skip_batches=2, batch_size=4), 8)


# ----------------------------------------------------------------------------------------------- bad data
def cut(src, dst, fraction):
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def test_bad_samples_and_shards_are_skipped_counted_and_logged(tmp_path, caplog):
    urls = write_tiny_shards(tmp_path / "a", num_shards=4, per_shard=10, size=24, corrupt=3, missing_caption=2)
    good = write_tiny_shards(tmp_path / "b", num_shards=1, per_shard=10, size=24, seed=5)
    cut(good[0], tmp_path / "cut.tar", 0.55)  # the tar cut in the middle of a member
    shard_list = urls + [str(tmp_path / "cut.tar"), str(tmp_path / "missing.tar")]
    with caplog.at_level(logging.WARNING, logger="mtn.data"):
        stream = ShardStream(shard_list, LENIENT, batch_size=4)
        samples = [(x["shard"], x["key"]) for x in stream]
    stats = stream.stats()
    assert stats["skipped_corrupt"] == 3 and stats["skipped_no_caption"] == 2
    assert stats["truncated_shards"] == 1 and stats["failed_shards"] == 1
    from_cut = sorted(k for shard, k in samples if shard.endswith("cut.tar"))
    assert 0 < len(from_cut) < 10 and from_cut == all_keys(good)[: len(from_cut)]  # the part before the cut
    assert len(samples) == len(set(samples)) == 40 - 5 + len(from_cut) == stats["samples"]
    text = caplog.text
    assert "truncated shard" in text and "failed shard" in text and "missing.tar" in text
    assert "skipped_corrupt" in text and "skipped_no_caption" in text
    # the same counts reach the main process through two DataLoader workers: per batch and as totals
    loader = make_loader(ShardStream(shard_list, LENIENT, batch_size=4), 4, num_workers=2)
    summed = {}
    for batch in loader:
        for key, v in batch["stats"].items():
            summed[key] = summed.get(key, 0) + v
    assert summed == loader.totals
    assert {k: v for k, v in summed.items() if k not in ("samples", "dropped_tail")} == \
        {k: v for k, v in stats.items() if k not in ("samples", "dropped_tail")}
    assert summed["samples"] + summed["dropped_tail"] == stats["samples"]


def test_s3_truncated_and_unreadable_shards(s3_shards, tmp_path, local_shards):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    cut(local_shards[0], tmp_path / "cut.tar", 0.5)
    fs.put_file(str(tmp_path / "cut.tar"), "bucket/laion/00000.tar")  # replace the first shard by half of it
    urls = list_shards("s3://bucket/laion/*.tar") + ["s3://bucket/laion/nope.tar"]
    loader = make_loader(ShardStream(urls, LENIENT, batch_size=2), 2, num_workers=2)
    keys = [k for b in loader for k in b["keys"]]
    assert loader.totals["truncated_shards"] == 1 and loader.totals["failed_shards"] == 1
    assert len(keys) == len(set(keys)) and 70 < len(keys) + loader.totals["dropped_tail"] < 80


def test_filters_count_skipped_filtered(tmp_path):
    rows = [("a", (20, 40), "abc"), ("b", (50, 50), "a caption of ok length"), ("c", (64, 30), "x" * 60),
            ("d", (40, 64), "fine caption here")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, (w, h), caption in rows:
            img = io.BytesIO()
            Image.new("RGB", (w, h), (10, 20, 30)).save(img, format="PNG")
            meta = json.dumps({"width": w, "height": h}).encode() if key != "d" else b"{}"  # d: size from header
            for name, data in ((f"{key}.png", img.getvalue()), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "f.tar").write_bytes(buf.getvalue())
    cfg = StreamConfig(resolution=16, min_caption_chars=5, max_caption_chars=50, min_image_size=35)
    stream = ShardStream([str(tmp_path / "f.tar")], cfg)
    assert sorted(x["key"] for x in stream) == ["b", "d"]  # a: short caption, c: long caption and 30 px side
    assert stream.stats()["skipped_filtered"] == 2 and stream.stats()["samples"] == 2


# ----------------------------------------------------------------------------------------------- images
def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def stripes(w, h):
    """Red | green | blue vertical bands: the left and right quarters, the middle half."""
    img = Image.new("RGB", (w, h), (0, 255, 0))
    img.paste((255, 0, 0), (0, 0, w // 4, h))
    img.paste((0, 0, 255), (w - w // 4, 0, w, h))
    return img


def test_stream_output_shape_and_range(local_shards):
    x = next(iter(ShardStream(local_shards, StreamConfig(resolution=20, shuffle_buffer=4))))
    px = x["pixel_values"]
    assert px.shape == (3, 20, 20) and px.dtype == torch.float32
    assert -1 <= px.min() and px.max() <= 1 and isinstance(x["caption"], str) and x["caption"]


def test_center_crop_of_a_known_image():
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)
    exact = train_transform(decode_image(png(stripes(96, 48))), 48)  # no resize: the middle half is the crop
    assert exact.shape == (3, 48, 48) and torch.equal(exact, green.expand(3, 48, 48))
    resized = train_transform(decode_image(png(stripes(192, 96))), 48)  # 192x96 -> 96x48 -> crop cols 24..72
    assert resized.shape == (3, 48, 48) and resized.min() >= -1 and resized.max() <= 1
    assert torch.allclose(resized[:, :, 4:44], green.expand(3, 48, 40), atol=2 / 127.5)
    tall = train_transform(decode_image(png(stripes(96, 48).rotate(90, expand=True))), 48)  # 48x96, bands across
    assert tall.shape == (3, 48, 48) and torch.equal(tall, green.expand(3, 48, 48))


def test_random_crop_and_flip_are_seeded(local_shards):
    cfg = StreamConfig(resolution=16, shuffle_buffer=4, center_crop=False, random_flip=True)
    a = [x["pixel_values"] for x in ShardStream(local_shards[:2], cfg)]
    b = [x["pixel_values"] for x in ShardStream(local_shards[:2], cfg)]
    c = [x["pixel_values"] for x in ShardStream(local_shards[:2], StreamConfig(resolution=16, shuffle_buffer=4))]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_jpeg_draft_decode_stays_close():
    img = stripes(400, 200)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    fast = train_transform(decode_image(buf.getvalue(), min_side=48), 48)
    full = train_transform(decode_image(buf.getvalue()), 48)
    assert decode_image(buf.getvalue(), min_side=48).size == (100, 50)  # 1/4 DCT scale, shorter side still >= 48
    assert (fast - full).abs().mean() < 0.03


# ----------------------------------------------------------------------------------------------- listing
def test_list_shards_sources(local_shards, tmp_path):
    folder = local_shards[0].rsplit("/", 1)[0]
    assert list_shards(folder) == local_shards
    assert list_shards(f"{folder}/0000[0-3].tar") == local_shards[:4]
    assert list_shards(f"{folder}/{{00002..00005}}.tar") == local_shards[2:6]
    assert list_shards(f"{folder}/{{00006..00099}}.tar") == local_shards[6:]  # missing members dropped (warned)
    assert list_shards(local_shards[3]) == [local_shards[3]]
    listing = tmp_path / "train.txt"
    listing.write_text(f"# laion subset\n{local_shards[1]}\n\n{local_shards[0]}\n{local_shards[1]}\n")
    assert list_shards(str(listing)) == local_shards[:2]
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "list.txt").write_text("../rel/x.tar\n")
    assert list_shards(str(tmp_path / "rel" / "list.txt")) == [str(tmp_path / "rel" / "x.tar")]
    for bad in (f"{folder}/*.zip", str(tmp_path / "none"), f"{folder}/{{00010..00012}}.tar", str(tmp_path / "rel")):
        with pytest.raises(MTNError, match="no shards"):
            list_shards(bad)


def test_list_shards_s3(s3_shards):
    assert s3_shards == [f"s3://bucket/laion/{i:05d}.tar" for i in range(8)]
    assert list_shards("s3://bucket/laion/*.tar") == s3_shards
    assert list_shards("s3://bucket/laion/{00001..00003}.tar") == s3_shards[1:4]
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).pipe("bucket/lists/train.txt", b"# two\n../laion/00000.tar\n"
                                                     b"s3://bucket/laion/00007.tar\n")
    assert list_shards("s3://bucket/lists/train.txt") == [s3_shards[0], s3_shards[7]]
    with pytest.raises(MTNError, match="no shards"):
        list_shards("s3://bucket/nothing/")


def test_write_tiny_shards_to_s3_and_stream_back(s3_endpoint):
    import boto3

    boto3.client("s3").create_bucket(Bucket="tiny")
    urls = write_tiny_shards("s3://tiny/set", num_shards=2, per_shard=6, size=24, missing_caption=1)
    assert urls == list_shards("s3://tiny/set") == ["s3://tiny/set/00000.tar", "s3://tiny/set/00001.tar"]
    stream = ShardStream(urls, CFG)
    assert len([x for x in stream]) == 11 and stream.stats()["skipped_no_caption"] == 1


def test_tar_reader_long_names_and_formats(tmp_path):
    from mtn.data.shardio import iter_samples

    long_key = "sub/" + "k" * 150
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for name, data in ((f"{long_key}.JPG", b"x" * 700), (f"{long_key}.txt", b"cap"), ("b.seg.png", b"p")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        assert list(iter_samples(buf)) == [(long_key, {"jpg": b"x" * 700, "txt": b"cap"}), ("b", {"seg.png": b"p"})]
