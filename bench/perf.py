"""Performance ratios, each measured in one run on this machine (scripts, not tests).

    python bench/perf.py cache-vs-fly  # (b) an epoch from the feature cache vs an epoch encoding on the fly
    python bench/perf.py latency       # (c) MTN encoder vs the source encoder's own forward, same batch

Both use the real Multi30k de setup (jobs/configs/multi30k.yaml source_lang=de: e5-small -> MiniLM) and its
feature cache (python jobs/extract_features.py --config jobs/configs/multi30k.yaml source_lang=de). The train job
against a bare loop (formerly `ray-vs-bare`) is `python bench/speed.py train`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "multi30k.yaml"


def job():
    from jobs import train_mtn

    return train_mtn


def config(*overrides):
    from mtn.config import load_config

    return load_config(CONFIG, ["source_lang=de", *overrides])


def bare_steps(cfg, rows, steps: int, warmup: int = 5, encoders=None, pairs=None, split: bool = False):
    """The job's own model, loss and batch order in a plain loop (torch AdamW + clipping, no Ray, no DeepSpeed).
    Returns seconds per step after `warmup` steps (split=True: (data seconds, compute seconds) per step).
    With `encoders`, each batch is encoded from text first."""
    from mtn.data.corpus import batch_indices
    from mtn.data.features import encode_rows
    from mtn.model import TokenDiscriminator

    j = job()
    torch.manual_seed(cfg.seed)
    mtn = j.build_mtn(cfg, 384, 384)
    module = j.MTNTrainModule(mtn, TokenDiscriminator(384, cfg.disc_hidden_dim), cfg.loss_weights, cfg.mse_on_mask)
    opt = torch.optim.AdamW([p for n, p in module.named_parameters() if not n.startswith("disc.")], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    n = len(pairs) if pairs is not None else len(rows["source"])
    it = batch_indices(n, cfg.batch_size, 0, 1, cfg.seed, 0)
    t0, data_s = None, 0.0
    for step in range(steps + warmup):
        if step == warmup:
            t0, data_s = time.perf_counter(), 0.0
        td = time.perf_counter()
        idx = next(it)
        if encoders is None:
            b = {k: v[idx] for k, v in rows.items()}
        else:
            with torch.no_grad():
                b = encode_rows(*encoders, [pairs[i] for i in idx.tolist()], full_target=not cfg.mse_on_mask,
                                batch_size=len(idx))
        data_s += time.perf_counter() - td
        total, _ = module(b["source"].float(), b["source_mask"], b["target"].float(), b["target_mask"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    total_s = (time.perf_counter() - t0) / steps
    return (data_s / steps, total_s - data_s / steps) if split else total_s


def cache_vs_fly(rows_in_epoch: int) -> None:
    from mtn.data import config_pairs
    from mtn.data.features import load_features
    from mtn.encoders import load_text_encoder

    cfg = config()
    torch.set_num_threads(os.cpu_count() or 1)
    steps = rows_in_epoch // cfg.batch_size
    t0 = time.perf_counter()
    rows = load_features(cfg.feature_cache, rows=rows_in_epoch)  # reads the whole cache, keeps the first rows
    read = time.perf_counter() - t0
    c_data, c_step = bare_steps(cfg, rows, steps, warmup=0, split=True)
    pairs = config_pairs(cfg)[0][:rows_in_epoch]
    t0 = time.perf_counter()
    encoders = (load_text_encoder(cfg.source_encoder, cfg.source_max_length, cfg.source_prefix),
                load_text_encoder(cfg.target_encoder, cfg.target_max_length, cfg.target_prefix))
    load = time.perf_counter() - t0
    f_data, f_step = bare_steps(cfg, None, steps, warmup=0, encoders=encoders, pairs=pairs, split=True)
    cached, fly = read + steps * (c_data + c_step), load + steps * (f_data + f_step)
    print(f"(b) one epoch of {steps * cfg.batch_size} pairs, MTN-3RM, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads:")
    print(f"    from the feature cache: {cached:.1f} s = read {read:.1f} s + batches {steps * c_data:.1f} s "
          f"+ MTN steps {steps * c_step:.1f} s")
    print(f"    encoding on the fly:    {fly:.1f} s = encoder load {load:.1f} s + encoding {steps * f_data:.1f} s "
          f"+ MTN steps {steps * f_step:.1f} s")
    print(f"    ratio on-the-fly / cache, whole epoch = {fly / cached:.2f}x  (goal >= 5x)")
    print(f"    ratio on the data side only (encoders vs cache, MTN steps excluded) = "
          f"{(load + steps * f_data) / (read + steps * c_data):.1f}x")


def latency(batch: int, repeats: int) -> None:
    from mtn.data import config_pairs
    from mtn.encoders import load_text_encoder
    from mtn.model import ModelTranslationNetwork

    cfg = config()
    torch.set_num_threads(os.cpu_count() or 1)
    source = load_text_encoder(cfg.source_encoder, cfg.source_max_length, cfg.source_prefix)
    mtn = ModelTranslationNetwork.from_named_size(cfg.mtn_size, source_dim=source.hidden_size, target_dim=384,
                                                  source_len=cfg.source_max_length, target_len=cfg.target_max_length,
                                                  with_decoder=False).eval()
    prompts = [s for s, _ in config_pairs(cfg)[1][:batch]]
    src_t, mtn_t = [], []
    with torch.no_grad():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            hidden, mask = source(prompts, zero_pad=True)  # what Translator.encode runs
            t1 = time.perf_counter()
            mtn.encode(hidden, mask)
            t2 = time.perf_counter()
            if i >= 2:
                src_t.append(t1 - t0)
                mtn_t.append(t2 - t1)
    s, m = statistics.median(src_t) * 1e3, statistics.median(mtn_t) * 1e3
    print(f"(c) batch of {batch} val prompts, median of {repeats}, {torch.get_num_threads()} CPU threads:")
    print(f"    source encoder (e5-small) forward: {s:.1f} ms   MTN-3RM encoder: {m:.1f} ms")
    print(f"    ratio MTN / source encoder = {m / s:.2f}x  (the added cost of a translated prompt: +{100 * m / s:.0f}%)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["cache-vs-fly", "latency"])
    p.add_argument("--rows", type=int, default=1024, help="(b) pairs in the epoch")
    p.add_argument("--batch", type=int, default=32, help="(c) prompts per batch")
    p.add_argument("--repeats", type=int, default=10, help="(c) timed repeats")
    a = p.parse_args(argv)
    {"cache-vs-fly": lambda: cache_vs_fly(a.rows),
     "latency": lambda: latency(a.batch, a.repeats)}[a.which]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
