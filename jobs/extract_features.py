"""Run the frozen source and target encoders once over a corpus and write a feature cache (Ray Data).

    python jobs/extract_features.py                                        # local.yaml: tiny encoders, CPU
    python jobs/extract_features.py --config jobs/configs/multi30k.yaml source_lang=de
    ray job submit --working-dir . -- python jobs/extract_features.py --config ... extract_gpus_per_worker=1

Reads the same config as jobs/train_mtn.py: the encoders, the corpus (train + val pairs, exactly as training would
split them) and `feature_cache` / `val_feature_cache` (local folders or s3://). Encoders run as a Ray Data actor
pool of `extract_workers` actors (`cpus_per_worker` CPUs or `extract_gpus_per_worker` GPUs each); shards are written
by the Ray Data tasks that receive them into a new generation folder beside any older cache, and the manifest last:
until it replaces the old one the old cache stays valid, then the old shards are removed. A cache whose record
matches but whose shards fail their checksums is re-extracted. Then train with the same config:

    python jobs/train_mtn.py --config jobs/configs/multi30k.yaml source_lang=de   # finds the caches, no encoders
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from mtn.cli import job_parser
from mtn.config import load_config
from mtn.data import config_files, config_pairs
from mtn.data.features import (
    check_cache,
    discard_generation,
    expected_record,
    new_generation,
    prune_cache,
    verify_shards,
    write_feature_manifest,
    write_shard,
)
from mtn.errors import MTNError
from mtn.train.cluster import init_ray, local_cpus
from mtn.train_config import TrainConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"
SORT_WINDOW = 16  # encoder batches per actor call, each side sorted by token count within it


class EncodePairs:
    """Ray Data actor: loads both frozen encoders once, then maps text batches to token features."""

    def __init__(self, cfg: dict, threads: int):
        from mtn.encoders import load_text_encoder

        torch.set_num_threads(max(1, threads))
        cfg = TrainConfig(**cfg)
        device = "cuda" if cfg.extract_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        kw = dict(dtype=cfg.encoder_dtype, device=device)
        self.source = load_text_encoder(cfg.source_encoder, cfg.source_max_length, cfg.source_prefix,
                                        cfg.source_subfolder, revision=cfg.source_revision, **kw)
        self.target = load_text_encoder(cfg.target_encoder, cfg.target_max_length, cfg.target_prefix,
                                        cfg.target_subfolder, revision=cfg.target_revision, **kw)
        # numpy has no bfloat16: hand float32 to the writer, which casts; float16 travels as float16
        self.np_dtype = np.float16 if cfg.feature_dtype == "float16" else np.float32
        self.full_target = cfg.cache_target_padding
        self.batch_size = cfg.extract_batch_size

    def encode_sorted(self, encoder, texts: list[str], zero_pad: bool) -> tuple[np.ndarray, np.ndarray]:
        """Encoder batches of `batch_size` texts in length order, scattered back to the input order: each side
        sorted on its own, so a batch of short sources is not padded to its longest target (or the reverse)."""
        # token counts, not characters: 20% fewer padded tokens on Multi30k (one fast-tokenizer pass, ~1% of a batch)
        lengths = [len(ids) for ids in encoder.tokenizer([encoder.prefix + t for t in texts], truncation=True,
                                                         max_length=encoder.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        hidden, mask = None, None
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            h, m = encoder([texts[j] for j in idx], zero_pad=zero_pad)  # [b, S, d], [b, S]; pads are 0 if zero_pad
            if hidden is None:
                hidden = np.empty((len(texts), *h.shape[1:]), dtype=self.np_dtype)
                mask = np.empty((len(texts), m.shape[1]), dtype=np.int64)
            hidden[idx], mask[idx] = h.float().cpu().numpy(), m.cpu().numpy()
        return hidden, mask

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        src, src_m = self.encode_sorted(self.source, list(batch["source"]), True)  # [n, S_s, d_s], [n, S_s]
        # [n, S_t, d_t]: every position (the UNet attends to padding too), unless the config zero-pads them
        tgt, tgt_m = self.encode_sorted(self.target, list(batch["target"]), not self.full_target)
        return {"index": batch["index"], "source": src, "source_mask": src_m, "target": tgt, "target_mask": tgt_m}


def write_shards(batch: dict[str, np.ndarray], url: str, dtype: str, trim_target: bool,
                 generation: str) -> dict[str, np.ndarray]:
    rows = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}  # a writable copy
    entry = write_shard(url, rows, getattr(torch, dtype), trim_target, generation)
    return {"file": np.array([entry["file"]]), "rows": np.array([entry["rows"]]), "sha256": np.array([entry["sha256"]]),
            "source_dim": np.array([batch["source"].shape[-1]]), "target_dim": np.array([batch["target"].shape[-1]])}


def extract(cfg: TrainConfig, pairs: list[tuple[str, str]], url: str, record: dict) -> dict:
    """Encode `pairs` into a new generation of the cache at `url`; returns the manifest. An older cache there stays
    valid until the new manifest replaces its own (a failed run leaves it untouched), then its shards go."""
    generation = new_generation()
    try:
        out = encode_and_write(cfg, pairs, url, generation)
        shards = [{"file": str(r["file"]), "rows": int(r["rows"]), "sha256": str(r["sha256"])} for r in out]
        if sum(s["rows"] for s in shards) != len(pairs):
            raise MTNError(f"extraction wrote {sum(s['rows'] for s in shards)} rows for {len(pairs)} pairs")
        dims = {"source_len": cfg.source_max_length, "target_len": cfg.target_max_length,
                "source_dim": int(out[0]["source_dim"]), "target_dim": int(out[0]["target_dim"])}
        manifest = write_feature_manifest(url, record, shards, dims, cfg.feature_dtype,  # the swap: old cache -> new one
                                  extra={"source_zero_padded": True, "target_zero_padded": not cfg.cache_target_padding})
    except BaseException:
        discard_generation(url, generation)
        raise
    prune_cache(url, manifest)  # the old generation, format-1 shards, anything an interrupted run left
    return manifest


def encode_and_write(cfg: TrainConfig, pairs: list[tuple[str, str]], url: str, generation: str) -> list[dict]:
    """The Ray Data pipeline: encoder actors, then shard writers into `url/generation/`. One row per shard."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.verbose_progress = False
    # length-sorted: each encoder batch pads to its longest caption, so neighbours of equal length waste no compute
    # (BENCHMARKS.md: the gain over corpus order). Each actor call takes SORT_WINDOW encoder batches and sorts each side
    # on its own within them (EncodePairs.encode_sorted); rows carry their corpus index, shards are re-ordered on load
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
    items = [{"index": i, "source": pairs[i][0], "target": pairs[i][1]} for i in order]
    rows_per_call = cfg.extract_batch_size * SORT_WINDOW
    blocks = max(1, -(-len(items) // rows_per_call))  # one block per actor call: no ragged remainders
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    gpu = cfg.extract_gpus_per_worker
    ds = ds.map_batches(EncodePairs, fn_constructor_kwargs={"cfg": cfg.to_dict(), "threads": cfg.cpus_per_worker},
                        compute=ray.data.ActorPoolStrategy(size=cfg.extract_workers),
                        batch_size=rows_per_call, num_cpus=0 if gpu else cfg.cpus_per_worker,
                        num_gpus=gpu or None)
    # writers are light tasks (no CPU reserved) so they run beside the encoder actors instead of waiting for them
    ds = ds.map_batches(write_shards, fn_kwargs={"url": url, "dtype": cfg.feature_dtype,
                                                  "trim_target": not cfg.cache_target_padding,
                                                  "generation": generation},
                        batch_size=cfg.extract_shard_rows, num_cpus=0)
    return ds.take_all()


def start_ray(cfg: TrainConfig) -> None:
    """Join or start Ray (mtn/train/cluster.py); left running until the process exits (both caches share it)."""
    init_ray(cfg.ray_address, local_cpus(cfg.extract_workers * cfg.cpus_per_worker),
             use_gpu=bool(cfg.extract_gpus_per_worker))


def up_to_date(url: str, record: dict, cfg: TrainConfig) -> bool:
    """The cache matches the config and every shard its checksum (reads the whole cache: far cheaper than
    encoding it again, and a corrupted cache is then repaired by simply rerunning this job)."""
    try:
        verify_shards(url, check_cache(url, record, needs_target_padding=cfg.cache_target_padding))
        return True
    except MTNError as e:
        if "does not match" not in str(e) and "not found" not in str(e):
            print(f"{str(e).splitlines()[0].split('; rebuild')[0]}: re-extracting it", file=sys.stderr)
        return False


def main(argv=None) -> int:
    p = job_parser(__doc__, DEFAULT_CONFIG, example="feature_cache=s3://b/f")
    p.add_argument("--force", action="store_true", help="re-extract even when a cache already matches the config")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides).resolve_paths()  # Ray workers may run in another directory
        if not cfg.feature_cache:
            raise MTNError("config: set feature_cache=PATH (local folder or s3://) to say where features go")
        train, val = config_pairs(cfg)
        jobs = [(train, cfg.feature_cache, config_files(cfg, "train"))]
        if cfg.val_feature_cache and val:
            jobs.append((val, cfg.val_feature_cache, config_files(cfg, "val")))
        records = [expected_record(cfg, pairs, files) for pairs, _, files in jobs]  # hashes encoders: fail early
        summary = []
        for (pairs, url, _), record in zip(jobs, records, strict=True):
            if not args.force and up_to_date(url, record, cfg):
                summary.append(f"  {url}: up to date (same encoders, lengths and corpus), kept; --force redoes it")
                continue
            t0 = time.perf_counter()
            start_ray(cfg)
            manifest = extract(cfg, pairs, url, record)
            summary.append(f"  {url}: {manifest['num_rows']} rows in {len(manifest['shards'])} shards, "
                           f"{time.perf_counter() - t0:.1f} s")
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n== extract_features finished ==\n" + "\n".join(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
