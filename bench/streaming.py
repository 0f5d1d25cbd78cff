"""Streaming webdataset shards from S3 on loopback (moto): raw GETs vs mtn.data.shards vs Ray Data.

    python bench/streaming.py                          # 40 shards x 100 samples, 512 px jpgs (~200 MB)
    python bench/streaming.py --shards 8 --per-shard 50 --size 256 --no-ray

Starts a ThreadedMotoServer on 127.0.0.1, writes toy img2dataset shards (all .jpg, with grain so they weigh like
photos; cached under --cache), uploads them with boto3 and measures, over the same objects:
  boto3 GET          sequential get_object().read() of every shard (the ceiling for one stream)
  reader raw         mtn's tar reader over s3fs, no image decode (one lane)
  mtn loader w=0/2   make_loader(ShardStream(...)): decode + resize + crop at --resolution, batches of --batch
  ray data           ray.data.read_webdataset(pyarrow S3) + map_batches(the same decode/transform) +
                     iter_torch_batches, i.e. what ray.train.get_dataset_shard() hands each worker
Not a test. Numbers depend on the machine's cores (the transform is CPU bound).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _serve(conn, stop):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    conn.send(server.get_host_and_port())
    stop.wait()
    server.stop()


def start_s3():
    """A ThreadedMotoServer on 127.0.0.1 in its own process (in ours it would take the GIL from the readers)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    stop = ctx.Event()
    proc = ctx.Process(target=_serve, args=(child, stop), daemon=True)
    proc.start()
    host, port = parent.recv()
    url = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"})

    def shutdown():
        stop.set()
        proc.join(10)

    return shutdown, url


def make_shards(args) -> list[Path]:
    from mtn.tiny.shards import write_tiny_shards

    folder = Path(args.cache) / f"{args.shards}x{args.per_shard}-{args.size}px"
    done = folder / ".complete"
    if not done.exists():
        t = time.perf_counter()
        write_tiny_shards(folder, num_shards=args.shards, per_shard=args.per_shard, size=args.size, seed=0,
                          formats=("jpg",), noise=12.0)
        done.write_text("ok")
        print(f"wrote {args.shards} shards in {time.perf_counter() - t:.0f} s -> {folder}")
    return sorted(folder.glob("*.tar"))


def timed(rows, name, fn, nbytes=None):
    t0 = time.perf_counter()
    samples, first = fn()
    dt = time.perf_counter() - t0
    rows.append({"name": name, "s": dt, "samples/s": samples / dt, "MB/s": nbytes / dt / 1e6 if nbytes else None,
                 "first": first})
    print(f"  {name}: {samples} samples in {dt:.1f} s", flush=True)


def bench_boto(files, bucket):
    import boto3

    s3 = boto3.client("s3")

    def run():
        for f in files:
            s3.get_object(Bucket=bucket, Key=f"laion/{f.name}")["Body"].read()
        return None, None

    return run


def bench_reader(urls):
    from mtn.data.shardio import ShardReader

    def run():
        return sum(1 for e in ShardReader(urls) if e[0] == "sample"), None

    return run


def bench_loader(urls, args, workers):
    from mtn.data.loader import make_loader
    from mtn.data.shards import ShardStream, StreamConfig

    def run():
        cfg = StreamConfig(resolution=args.resolution, shuffle_buffer=args.buffer)
        loader = make_loader(ShardStream(urls, cfg, batch_size=args.batch), args.batch, num_workers=workers)
        t0, n, first = time.perf_counter(), 0, None
        for batch in loader:
            first = first or time.perf_counter() - t0
            n += batch["pixel_values"].shape[0]  # [B, 3, R, R]
        return n, first

    return run


def bench_ray(endpoint, bucket, args):
    import numpy as np
    import pyarrow.fs
    import ray
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    from mtn.data.imageproc import decode_image, train_transform
    from mtn.train.cluster import init_ray

    init_ray(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", access_key="test",
                                 secret_key="test", region="us-east-1")
    res = args.resolution

    def transform(batch):
        pixels = [train_transform(decode_image(b, res), res).numpy() for b in batch["jpg"]]  # each [3, R, R]
        return {"pixel_values": np.stack(pixels), "caption": np.array([t.decode() for t in batch["txt"]])}

    def run():
        ds = ray.data.read_webdataset(f"{bucket}/laion/", filesystem=fs, decoder=None)  # raw bytes
        ds = ds.map_batches(transform, batch_size=args.batch, batch_format="numpy")
        t0, n, first = time.perf_counter(), 0, None
        class Collate(NumpyBatchCollateFn):  # numpy columns -> {"pixel_values": [B, 3, R, R], "captions": [str]}
            def __call__(self, b):
                return {"pixel_values": torch.from_numpy(b["pixel_values"]), "captions": b["caption"].tolist()}

        for batch in ds.iter_torch_batches(batch_size=args.batch, drop_last=True, collate_fn=Collate()):
            first = first or time.perf_counter() - t0
            n += batch["pixel_values"].shape[0]
        return n, first

    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=40)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--size", type=int, default=512, help="shorter image side of the stored jpgs")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (samples per lane)")
    p.add_argument("--cache", default="/tmp/mtn-bench-streaming")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="runs of each loader measurement (the best is kept)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    files = make_shards(args)
    nbytes = sum(f.stat().st_size for f in files)
    samples = args.shards * args.per_shard
    stop_s3, endpoint = start_s3()
    try:
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bench")
        for f in files:
            s3.put_object(Bucket="bench", Key=f"laion/{f.name}", Body=f.read_bytes())
        from mtn.data.shards import list_shards

        urls = list_shards("s3://bench/laion/")
        print(f"{len(urls)} shards, {samples} samples, {nbytes / 1e6:.0f} MB on {endpoint}; {os.cpu_count()} cores")
        rows: list[dict] = []
        s3.get_object(Bucket="bench", Key=f"laion/{files[0].name}")["Body"].read()  # warm the connection
        t0 = time.perf_counter()
        bench_boto(files, "bench")()
        dt = time.perf_counter() - t0
        rows.append({"name": "boto3 GET", "s": dt, "samples/s": samples / dt, "MB/s": nbytes / dt / 1e6, "first": None})
        timed(rows, "reader raw (s3fs + tar)", bench_reader(urls), nbytes)
        for w in (0, 2):
            for _ in range(args.repeat):
                timed(rows, f"mtn loader, num_workers={w}", bench_loader(urls, args, w), nbytes)
        if not args.no_ray:
            timed(rows, "ray data (read_webdataset)", bench_ray(endpoint, "bench", args), nbytes)
    finally:
        stop_s3()

    best: dict[str, float] = {}
    for r in rows:
        best[r["name"]] = max(best.get(r["name"], 0.0), r["samples/s"])
    rows = [r for r in rows if r["samples/s"] == best[r["name"]]]
    print(f"\n| path ({args.resolution} px, batch {args.batch}) | seconds | samples/s | MB/s | first batch s | "
          f"vs boto3 GET |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mb = f"{r['MB/s']:.0f}" if r["MB/s"] else ""
        first = f"{r['first']:.2f}" if r["first"] else ""
        print(f"| {r['name']} | {r['s']:.2f} | {r['samples/s']:.0f} | {mb} | {first} | "
              f"{r['samples/s'] / best['boto3 GET']:.3f} |")
    w0, w2 = best.get("mtn loader, num_workers=0"), best.get("mtn loader, num_workers=2")
    if w0 and w2:
        print(f"\nmtn loader: workers=2 / workers=0 = {w2 / w0:.2f}x")
    if "ray data (read_webdataset)" in best and w2:
        print(f"mtn loader (workers=2) / ray data = {w2 / best['ray data (read_webdataset)']:.2f}x")


if __name__ == "__main__":
    main()
