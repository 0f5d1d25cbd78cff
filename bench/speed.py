"""The product against a plain PyTorch loop doing the same work, side by side in one run (ratios printed).

    python bench/speed.py extract [--pairs 6000]             # jobs/extract_features.py (Ray Data) vs a plain loop
    python bench/speed.py train [--steps 150]                # jobs/train_mtn.py (Ray Train + DeepSpeed) vs bare loop
    python bench/speed.py encode TRANSLATOR [--prompts 1024] # Translator.encode vs a plain encoder + MTN loop

All use jobs/configs/multi30k.yaml (source_lang=all unless --set source_lang=...): multilingual-e5-small ->
all-MiniLM-L6-v2 on Multi30k, the real encoders from $MTN_SHARED/tools/real-encoders. `train` needs the feature cache
(python jobs/extract_features.py --config jobs/configs/multi30k.yaml). Results also append to
bench/results/speed.jsonl with the git commit and the CPU capability, since the CPU behind "2 cores" varies
(mtn/train/precision.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:  # `import bench.speed` (repo root on sys.path) or `python bench/speed.py` (bench/ on it)
    from bench.provenance import append_rows, git_commit
except ImportError:
    from provenance import append_rows, git_commit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "multi30k.yaml"
RESULTS = ROOT / "bench" / "results" / "speed.jsonl"
THREADS = 2  # what the job's one worker / encoder actor gets (cpus_per_worker)


def config(overrides):
    from mtn.config import load_config

    return load_config(CONFIG, overrides)


def machine() -> dict:
    from mtn.train.precision import resolve_precision

    return {"cpus": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "auto_precision": resolve_precision("auto"), "torch": torch.__version__, "platform": platform.machine()}


def record(kind: str, product: float, plain: float, unit: str, extra: dict) -> None:
    ratio = product / plain
    print(f"    product: {product:.2f} {unit}   plain loop: {plain:.2f} {unit}   ratio = {ratio:.2f}x  (goal >= 0.8x)")
    append_rows(RESULTS, [{"bench": kind, "product": product, "plain": plain, "unit": unit, "ratio": ratio, **extra,
                           "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                           "command": "python bench/speed.py " + " ".join(sys.argv[1:])}])  # + "git_commit"


def plain_encoder(path: str):
    """The encoder as a user would load it by hand: AutoTokenizer + AutoModel, eval, no wrapper."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


# ----------------------------------------------------------------------------------------------- extraction
def plain_extract(cfg, pairs, batch: int) -> float:
    """Both encoders over the pairs, each side sorted by token length, batches padded to their longest: seconds,
    encoder loading included (the job's actor loads them inside its timed run too)."""
    t0 = time.perf_counter()
    for texts, path, prefix, max_len in (([s for s, _ in pairs], cfg.source_encoder, cfg.source_prefix,
                                          cfg.source_max_length),
                                         ([t for _, t in pairs], cfg.target_encoder, cfg.target_prefix,
                                          cfg.target_max_length)):
        tok, model = plain_encoder(path)
        texts = [prefix + t for t in texts]
        lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=max_len)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        out = []
        with torch.inference_mode():
            for i in range(0, len(order), batch):
                enc = tok([texts[j] for j in order[i:i + batch]], padding="longest", truncation=True,
                          max_length=max_len, return_tensors="pt")
                out.append(model(**enc).last_hidden_state.half())  # [b, L, d], what a cache keeps
    return time.perf_counter() - t0


def bench_extract(overrides, n: int) -> None:
    from jobs import extract_features as job
    from mtn.data import config_pairs
    from mtn.data.features import expected_record

    cfg = config(overrides)
    pairs = config_pairs(cfg)[0][:n]
    with tempfile.TemporaryDirectory() as tmp:
        job.start_ray(cfg)  # a running cluster: start-up is not extraction throughput (reported apart below)
        t0 = time.perf_counter()
        manifest = job.extract(cfg, pairs, f"{tmp}/cache", expected_record(cfg, pairs, ["bench"]))
        product_s = time.perf_counter() - t0
    import ray

    ray.shutdown()
    assert manifest["num_rows"] == len(pairs)
    torch.set_num_threads(THREADS)
    plain_s = plain_extract(cfg, pairs, cfg.extract_batch_size)
    print(f"extract: {len(pairs)} pairs ({cfg.source_lang}), both encoders, batch {cfg.extract_batch_size}, "
          f"{THREADS} threads, fp32 encoders:")
    print(f"    jobs/extract_features.py (Ray Data actor + shard writers): {product_s:.1f} s;  "
          f"plain length-sorted loop: {plain_s:.1f} s")
    record("extract", len(pairs) / product_s, len(pairs) / plain_s, "pairs/s",
           {"pairs": len(pairs), "source_lang": cfg.source_lang})


# ----------------------------------------------------------------------------------------------- training
def bare_steps_per_s(cfg, steps: int, warmup: int = 10) -> tuple[float, str]:
    """The job's own model, loss, batch order and precision in a bare loop (torch AdamW + clipping)."""
    from jobs import train_mtn as job
    from mtn.data.corpus import batch_indices
    from mtn.data.features import load_features
    from mtn.model import TokenDiscriminator
    from mtn.train.precision import autocast, input_dtype, resolve_precision

    rows = load_features(cfg.feature_cache)
    torch.manual_seed(cfg.seed)
    d_s, d_t = rows["source"].shape[-1], rows["target"].shape[-1]
    mtn = job.build_mtn(cfg, d_s, d_t)
    if cfg.standardize:
        mtn.set_feature_stats(rows)
    module = job.MTNTrainModule(mtn, TokenDiscriminator(d_t, cfg.disc_hidden_dim), cfg.loss_weights,
                                cfg.mse_on_mask)
    opt = torch.optim.AdamW([p for n, p in module.named_parameters() if not n.startswith("disc.")], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    precision = resolve_precision(cfg.precision)
    dtype = input_dtype(precision)
    it = batch_indices(len(rows["source"]), cfg.batch_size, 0, 1, cfg.seed, 0)
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        idx = next(it)
        b = {k: v[idx] for k, v in rows.items()}  # [b, S_s, d_s] ... [b, S_t]: as the job slices its cache
        with autocast(precision):
            total, _ = module(b["source"].to(dtype), b["source_mask"], b["target"].to(dtype), b["target_mask"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - t0), precision


def bench_train(overrides, steps: int) -> None:
    cfg = config(overrides)
    with tempfile.TemporaryDirectory() as out:
        args = ["--config", str(CONFIG), *overrides, f"output_dir={out}", f"name=speed-{int(time.time())}",
                f"max_steps={steps + 10}", "max_val_samples=0", "compare_linear=false",
                f"checkpoint_every={10**6}", "num_workers=1", f"cpus_per_worker={THREADS}"]
        env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "jobs/train_mtn.py", *args], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        job_sps = json.loads((Path(out) / "metrics.json").read_text())["perf/steps_per_s"]
    torch.set_num_threads(THREADS)
    bare_sps, precision = bare_steps_per_s(cfg, steps)
    print(f"train: {steps} steps x batch {cfg.batch_size}, {cfg.block_layout} x{cfg.num_modules}, losses "
          f"{ {k: v for k, v in cfg.loss_weights.items() if v} }, precision {precision}, {THREADS} threads:")
    print(f"    jobs/train_mtn.py (Ray Train + DeepSpeed, 1 worker; whole command {wall:.0f} s)")
    record("train", job_sps, bare_sps, "steps/s", {"steps": steps, "batch_size": cfg.batch_size,
                                                    "precision": precision, "samples_per_s": job_sps * cfg.batch_size})


# ----------------------------------------------------------------------------------------------- inference
def bench_encode(overrides, translator: str, n: int, batch: int) -> None:
    import statistics

    from mtn.data import config_pairs
    from mtn.translator import load_translator

    cfg = config(overrides)
    prompts = [s for s, _ in config_pairs(cfg)[1][:n]]  # val captions, every language, as they come
    torch.set_num_threads(THREADS)
    tr = load_translator(translator)
    tok, model = plain_encoder(tr.source_encoder.name_or_path)
    mtn, spec = tr.mtn, tr.manifest["source_encoder"]

    @torch.inference_mode()
    def plain():
        out = []
        for i in range(0, len(prompts), batch):
            enc = tok([spec["prefix"] + p for p in prompts[i:i + batch]], padding="longest", truncation=True,
                      max_length=spec["max_length"], return_tensors="pt")
            pad = spec["max_length"] - enc["input_ids"].shape[1]  # the LM stops at the longest; the MTN wants S_s
            hidden = torch.nn.functional.pad(model(**enc).last_hidden_state, (0, 0, 0, pad))  # [b, S_s, d_s]
            out.append(mtn.encode(hidden, torch.nn.functional.pad(enc["attention_mask"], (0, pad))))  # [b, S_t, d_t]
        return torch.cat(out)

    def product():
        return tr.encode(prompts, batch_size=batch)

    times = {"product": [], "plain": []}
    for rep in range(3):  # interleaved, so drift on a shared box hits both alike; the first round warms up
        for name, fn in (("product", product), ("plain", plain)):
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    diff = (product() - plain()).abs().max().item()
    prod, base = (len(prompts) / statistics.median(times[k]) for k in ("product", "plain"))
    print(f"encode: {len(prompts)} val prompts ({cfg.source_lang}), batch {batch}, {THREADS} threads, "
          f"max |product - plain| = {diff:.2e}:")
    record("encode", prod, base, "prompts/s", {"prompts": len(prompts), "batch": batch, "max_abs_diff": diff})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--pairs", type=int, default=6000)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=150)
    c = sub.add_parser("encode")
    c.add_argument("translator")
    c.add_argument("--prompts", type=int, default=1024)
    c.add_argument("--batch", type=int, default=64)
    for sp in (e, t, c):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    git_commit()  # the commit this run starts from: the row it writes names it
    if a.cmd == "extract":
        bench_extract(a.overrides, a.pairs)
    elif a.cmd == "train":
        bench_train(a.overrides, a.steps)
    else:
        bench_encode(a.overrides, a.translator, a.prompts, a.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
