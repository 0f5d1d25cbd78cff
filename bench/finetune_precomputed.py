"""Finetune throughput from images vs from precomputed latents (jobs/precompute_latents.py), same config.

    python bench/finetune_precomputed.py [--steps 30] [--workers 1] [key=value ...]   # default: the tiny config

Runs jobs/finetune_unet.py twice into a temporary folder (first on the image shards, then on latents precomputed
from the same shards) and prints each run's images/s and data-wait fraction as the job measured them (from its
first step on, loader start-up included), and their ratio. A benchmark, never a test; run it alone on the machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> None:
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"max_steps={a.steps}", f"num_workers={a.workers}", f"val_every={a.steps}",
                  f"checkpoint_every={a.steps}", *a.overrides]
        rows = {}
        for label, extra in (("images", []), ("precomputed", [f"precomputed={tmp}/img/latents"])):
            out = f"{tmp}/{label}"
            if label == "precomputed":
                run(["jobs/precompute_latents.py", f"output_dir={tmp}/img", f"train_shards={tmp}/img/shards",
                     *a.overrides])
            run(["jobs/finetune_unet.py", f"output_dir={out}", f"train_shards={tmp}/img/shards", *common, *extra])
            rows[label] = json.loads(Path(out, "metrics.json").read_text())
    for label, m in rows.items():
        print(f"{label:12s} {m['perf/images_per_s']:8.1f} images/s   data wait {100 * m['perf/data_wait_frac']:5.1f}%")
    print(f"ratio precomputed/images: {rows['precomputed']['perf/images_per_s'] / rows['images']['perf/images_per_s']:.2f}x"
          f"  ({a.steps} steps, {a.workers} worker(s), overrides {a.overrides or 'none'})")


if __name__ == "__main__":
    main()
