"""Real-encoder benchmark on Multi30k: multilingual-e5-small -> all-MiniLM-L6-v2, test_2016/2017_flickr.

    python $MTN_SHARED/tools/real-encoders/materialize.py                # once: the two real encoders
    python bench/multi30k.py extract --lang de                           # train/val/test feature caches
    python bench/multi30k.py run linear mtn-3rm-skip --lang de           # train rows, evaluate on the test sets
    python bench/multi30k.py table                                       # BENCHMARKS.md table from the results

Every row trains through jobs/train_mtn.py with jobs/configs/multi30k.yaml (source_lang=<lang>) plus the row's
overrides, then the translator it wrote is scored on the cached test sets with mtn.metrics (token MSE over real
target tokens in raw units, pooled cosine, R@1/R@5 among the test set). Results append to
bench/results/multi30k.jsonl with the command, wall time, machine and git commit. `--lang all` trains the shared
multilingual MTN and scores it on each language's test sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

try:  # `import bench.multi30k` (repo root on sys.path) or `python bench/multi30k.py` (bench/ on it)
    from bench.provenance import append_rows, git_commit
except ImportError:
    from provenance import append_rows, git_commit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "jobs/configs/multi30k.yaml"
RESULTS = ROOT / "bench" / "results" / "multi30k.jsonl"
FEATURES = os.environ.get("MTN_FEATURES", "outputs/features")
TEST_SETS = {"de": ["test_2016_flickr", "test_2017_flickr"], "fr": ["test_2016_flickr", "test_2017_flickr"],
             "cs": ["test_2016_flickr"]}  # Multi30k has no Czech test_2017_flickr
LANGS = ["de", "fr", "cs"]
MTN = ["linear_skip=true", "hidden_dim=192", "max_steps=400", "batch_size=32", "lr=1e-3", "warmup_steps=30"]
ABLATION = ["hidden_dim=192", "max_steps=150", "batch_size=32", "lr=1e-3", "compare_linear=false"]
OLD = ["block_layout=gluegen", "standardize=false", "decoder_modules=null", "loss_rec=0", "precision=fp32",
       "language_mix=interleave", "max_train_samples=15000", "lr_min_ratio=0.01"]  # the previous recipe
ROWS = {
    "linear": ["method=linear"],
    "pooled-linear": ["method=pooled_linear"],
    "mtn": ["compare_linear=false"],  # jobs/configs/multi30k.yaml as it is (the linear row is its baseline)
    # rows of the previous recipe, one MTN per language (bench/results/multi30k.jsonl keeps them; `table` shows them
    # on request)
    "mtn-3rm": [*OLD, "mtn_size=mtn-3rm", "max_steps=600", "batch_size=32", "lr=1e-3", "warmup_steps=30"],
    "mtn-3rm-skip": [*OLD, "mtn_size=mtn-3rm", *MTN],
    "mtn-5rm-skip": [*OLD, "mtn_size=mtn-5rm", *MTN],
    "abl-mse": [*OLD, *ABLATION],
    "abl-mse+rec": [*OLD, *ABLATION, "loss_rec=0.1"],
    "abl-mse+rec+adv": [*OLD, *ABLATION, "loss_rec=0.1", "loss_adv=0.01"],
    "abl-mse+rec+adv+cycle": [*OLD, *ABLATION, "loss_rec=0.1", "loss_adv=0.01", "loss_cycle=0.1"],
}


def py(script: str, *args: str) -> tuple[list[str], float]:
    cmd = [sys.executable, script, "--config", CONFIG, *args]
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}")
    return cmd, time.perf_counter() - t0


def test_cache(lang: str, test_set: str) -> str:
    return f"{FEATURES}/multi30k-{lang}/{test_set}"


def extract(lang: str, extra: list[str]) -> None:
    py("jobs/extract_features.py", f"source_lang={lang}", *extra)
    for lg in LANGS if lang == "all" else [lang]:
        for ts in TEST_SETS[lg]:
            if not (ROOT / test_cache(lg, ts) / "manifest.json").exists():
                py("jobs/extract_features.py", f"source_lang={lg}", "val_source_file=null", "val_target_file=null",
                   "val_fraction=0", "max_val_samples=0", "max_train_samples=null",
                   f"source_file={{data_root}}/multi30k/{ts}.{lg}.gz",
                   f"target_file={{data_root}}/multi30k/{ts}.en.gz", f"feature_cache={test_cache(lg, ts)}",
                   "val_feature_cache=null", *extra)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {gpu}"


def cpu_capability() -> str:
    """torch's capability plus whether bf16 runs natively (the dtype `precision: auto` picks follows it)."""
    from mtn.train.precision import describe

    return describe("cpu")


def score(translator: Path, lang: str) -> dict:
    """The translator's model on each cached test set of `lang` (no encoders: the cache holds their outputs)."""
    from mtn.baselines import predict
    from mtn.data.features import load_features, read_feature_manifest
    from mtn.metrics import alignment_metrics
    from mtn.translator import load_translation_model, read_translator_manifest

    model, spec = load_translation_model(translator), read_translator_manifest(translator)["source_encoder"]
    out = {}
    for ts in TEST_SETS[lang]:
        url = str(ROOT / test_cache(lang, ts))
        cache = read_feature_manifest(url)
        for key in ("name_or_path", "max_length", "prefix"):
            if cache["source_encoder"][key] != spec[key]:
                sys.exit(f"{url} was extracted with another source encoder {key}: {cache['source_encoder'][key]!r}")
        rows = load_features(url, cache)
        out[ts] = alignment_metrics(predict(model, rows), rows["target"], rows["target_mask"])
    return out


def run(row: str, lang: str, extra: list[str]) -> None:
    run_row(row, lang, ROWS[row], extra)


def run_row(row: str, lang: str, overrides: list[str], extra: list[str], key: str | None = None) -> None:
    out_dir = f"outputs/bench/{lang}-{row.replace('/', '-')}"
    args = [f"source_lang={lang}", f"output_dir={out_dir}", f"name=bench-{lang}-{row.replace('/', '-')}-{int(time.time())}",
            *overrides, *extra]
    cmd, wall = py("jobs/train_mtn.py", *args)
    metrics = json.loads((ROOT / out_dir / "metrics.json").read_text())
    for lg in LANGS if lang == "all" else [lang]:
        for ts, m in score(ROOT / out_dir / "translator", lg).items():
            rec = {"row": row, "extra": extra, "train_lang": lang, "lang": lg, "test_set": ts, **m, "train_wall_s": round(wall, 1),
                   **({"trial": key} if key else {}),
                   "val": {k: v for k, v in metrics.items() if k.startswith("val/")},
                   "command": shlex.join(["python", *cmd[1:]]), "machine": machine(),
                   "cpu_capability": cpu_capability(), "perf": {k: v for k, v in metrics.items() if "perf/" in k},
                   "date": time.strftime("%Y-%m-%d %H:%M")}
            append_rows(RESULTS, [rec])  # + "git_commit"
            print(f"{row:24s} {lang}->{lg} {ts:18s} token_mse {m['token_mse']:.4f}  pooled_cos {m['pooled_cosine']:.4f}"
                  f"  R@1 {m['r@1']:.3f}  R@5 {m['r@5']:.3f}  ({wall:.0f} s)")


def ablation(path: str) -> None:
    """Every (num_modules, variant) trial of a sweep-style ablation config (jobs/configs/ablations/*.yaml) trained
    to the end through jobs/train_mtn.py and scored on the test sets: rows named `<config stem>/<variant>`."""
    from mtn.config import load_config
    from mtn.sweep import SweepConfig

    cfg = load_config(ROOT / path, cls=SweepConfig)
    if Path(cfg.base_config) != Path(CONFIG):
        sys.exit(f"{path}: the bench scores ablations of {CONFIG}, not {cfg.base_config}")
    if cfg.lr_min != cfg.lr_max:
        sys.exit(f"{path}: an ablation runs at one lr (lr_min == lr_max); this one is a search, run it with "
                 "jobs/sweep_mtn.py")
    stem = Path(path).stem
    for modules in cfg.num_modules:
        for variant, overrides in cfg.variant_map().items():
            args = [*cfg.base_overrides, f"lr={cfg.lr_min}", f"num_modules={modules}", *overrides]
            lang = next((a.split("=", 1)[1] for a in reversed(args) if a.startswith("source_lang=")), "all")
            name = f"{stem}/{variant or 'base'}" + (f"-{modules}" if len(cfg.num_modules) > 1 else "")
            key = trial_key(args)
            done = [r for r in RESULTS.read_text().splitlines() if key in r] if RESULTS.exists() else []
            if done:  # the same trial already ran for another ablation (the recipe is in most of them): reuse it
                reuse(name, done)
                continue
            py("jobs/extract_features.py", *args)  # a variant's own corpus/encoders get their cache (else a no-op)
            run_row(name, lang, args, [], key)


def trial_key(args: list[str]) -> str:
    """What a trial trains, as a hash of its resolved config (names and output paths left out): equal trials of
    different ablations share one key."""
    import hashlib

    from mtn.config import load_config

    cfg = load_config(ROOT / CONFIG, args).to_dict()
    for k in ("name", "output_dir", "storage_path", "mlflow_tracking_uri"):
        cfg.pop(k, None)
    return "trial-" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def reuse(name: str, lines: list[str]) -> None:
    """Record an earlier identical trial's latest rows under this ablation's row name."""
    rows = [json.loads(x) for x in lines]
    first = rows[0]["row"]
    # copies of a measurement: they keep its git_commit (if it has one), not the current one
    append_rows(RESULTS, [{**r, "row": name, "same_trial_as": first} for r in rows if r["row"] == first], stamp=False)
    print(f"{name}: the same trial as {first}, reused")


def latest_results() -> dict:
    latest = {}
    for line in RESULTS.read_text().splitlines():
        r = json.loads(line)
        latest[(r["row"] + "".join(f" {x}" for x in r.get("extra", [])), r["train_lang"], r["lang"], r["test_set"])] = r
    return latest


def table(rows: list[str] | None = None, train_lang: str | None = None) -> str:
    """Latest result per (row, train_lang, lang, test_set) as a markdown table; `vs linear` is the token MSE
    against the linear map fitted on the same training pairs (same train_lang)."""
    latest = latest_results()
    head = ("| lang | test set | row (trained on) | token MSE | vs linear | pooled cos | R@1 | R@5 | train wall | CPU |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    order = {name: i for i, name in enumerate(ROWS)}
    for (row, tl, lg, ts), r in sorted(latest.items(), key=lambda kv: (kv[0][2], kv[0][3],
                                                                      order.get(kv[0][0].split()[0], len(order)),
                                                                      kv[0])):
        name = row.split()[0]
        if (rows and not any(name == x or name.startswith(f"{x}/") for x in rows)) \
                or (train_lang and tl != train_lang and "/" not in name):
            continue
        lin = latest.get(("linear", tl, lg, ts))
        delta = f"{100 * (r['token_mse'] / lin['token_mse'] - 1):+.1f}%" if lin else ""
        lines.append(f"| {lg} | {ts} | {row} ({tl}) | {r['token_mse']:.4f} | {delta} | {r['pooled_cosine']:.4f} | "
                     f"{r['r@1']:.3f} | {r['r@5']:.3f} | {r['train_wall_s']:.0f} s | {r.get('cpu_capability', '')} |")
    return "\n".join(lines)


def ablation_summary(langs: tuple[str, ...] = ("de",)) -> str:
    """One line per ablation trial (`<config>/<variant>` rows): means over the test sets of `langs` (de by default,
    where every trial, the per-language one included, has rows) of token MSE, its change against the linear map
    fitted on the shared pairs, pooled cosine and R@1; and the trial's val token MSE."""
    latest = latest_results()
    head = ("| ablation | variant | test token MSE | vs linear | pooled cos | R@1 | val token MSE | steps x batch |\n"
            "|---|---|---|---|---|---|---|---|")
    lines, names = [head], sorted({k[0] for k in latest if "/" in k[0]})
    for name in names:
        rows = [(k, r) for k, r in latest.items() if k[0] == name and k[2] in langs]
        lins = [latest.get(("linear", "all", k[2], k[3])) for k, _ in rows]
        if not rows or not all(lins):
            continue
        mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        rs = [r for _, r in rows]
        delta = 100 * (mean("token_mse", rs) / mean("token_mse", lins) - 1)
        cfg = next((x for x in reversed(rs[0]["command"].split()) if x.startswith("batch_size=")), "batch_size=64")
        steps = next((x for x in reversed(rs[0]["command"].split()) if x.startswith("max_steps=")), "")
        ablation, variant = name.split("/", 1)
        lines.append(f"| {ablation} | {variant} | {mean('token_mse', rs):.4f} | {delta:+.1f}% | "
                     f"{mean('pooled_cosine', rs):.4f} | {mean('r@1', rs):.3f} | "
                     f"{rs[0]['val'].get('val/token_mse', float('nan')):.4f} | "
                     f"{steps.split('=')[-1]} x {cfg.split('=')[-1]} |")
    return "\n".join(lines)


def verdict(row: str = "mtn", train_lang: str = "all") -> str:
    """The bar for `row`: token MSE >= 10% below the linear map, pooled cosine above the linear and the
    pooled-linear maps, R@1 at least as high as both; one line per test set."""
    latest = latest_results()
    out = []
    for (name, tl, lg, ts), r in sorted(latest.items()):
        lin, pool = latest.get(("linear", tl, lg, ts)), latest.get(("pooled-linear", tl, lg, ts))
        if name != row or tl != train_lang or not (lin and pool):
            continue
        mse = 100 * (1 - r["token_mse"] / lin["token_mse"])
        cos = r["pooled_cosine"] - max(lin["pooled_cosine"], pool["pooled_cosine"])
        r1 = r["r@1"] - max(lin["r@1"], pool["r@1"])
        ok = mse >= 10 and cos > 0 and r1 >= 0
        out.append(f"{lg} {ts}: token MSE {mse:+.1f}% below linear (bar 10%), pooled cos {cos:+.4f} over the best "
                   f"baseline, R@1 {r1:+.3f} over the best baseline -> {'PASS' if ok else 'FAIL'}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--lang", default="de", choices=[*LANGS, "all"])
    r = sub.add_parser("run")
    r.add_argument("rows", nargs="+", choices=list(ROWS))
    r.add_argument("--lang", default="de", choices=[*LANGS, "all"])
    for sp in (e, r):
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override (repeatable)")
    a = sub.add_parser("ablation")
    a.add_argument("config", help="a sweep-style ablation config, e.g. jobs/configs/ablations/standardize.yaml")
    t = sub.add_parser("table")
    t.add_argument("rows", nargs="*", help="only these rows (default: all)")
    t.add_argument("--train-lang", default=None, help="only rows trained on this language (all | de | fr | cs)")
    sm = sub.add_parser("summary", help="the ablation rows, one line per trial (means over the de test sets)")
    sm.add_argument("--langs", default="de")
    v = sub.add_parser("verdict")
    v.add_argument("--row", default="mtn")
    args = p.parse_args(argv)
    git_commit()  # the commit this command starts from: every row it writes names it
    if args.cmd == "extract":
        extract(args.lang, args.overrides)
    elif args.cmd == "run":
        for row in args.rows:
            run(row, args.lang, args.overrides)
    elif args.cmd == "ablation":
        ablation(args.config)
    elif args.cmd == "table":
        print(table(args.rows, args.train_lang))
    elif args.cmd == "summary":
        print(ablation_summary(tuple(args.langs.split(","))))
    else:
        print(verdict(args.row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
