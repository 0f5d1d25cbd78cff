"""Batched vs sequential requests against a running service (default: `python -m serve` on 127.0.0.1:8000).

    python bench/serve_batching.py [--url http://127.0.0.1:8000] [--requests 32] [--concurrency 8] [--steps 10]

Sends the same workload twice: one request at a time, then `concurrency` at a time (threads), all with the
same size/steps/guidance so `@serve.batch` may merge them. Prints requests/s of each and their ratio, plus the
mean batch size the service reported. A throughput benchmark, never a test; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["ein roter Hund läuft am Strand", "a small wooden cabin in the snowy mountains at night",
           "un chat noir dort sur le canapé", "una casa blanca junto al mar", "赤い犬がビーチを走っている"]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def run(url: str, n: int, concurrency: int, steps: int, size: int) -> tuple[float, list[int]]:
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "num_inference_steps": steps, "width": size,
               "height": size} for i in range(n)]
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda b: post(url, b), bodies))
    elapsed = time.perf_counter() - t
    return n / elapsed, [o["batch"]["requests"] for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    run(a.url, 4, 4, a.steps, a.size)  # warm-up: translators loaded, kernels compiled
    seq, seq_b = run(a.url, a.requests, 1, a.steps, a.size)
    con, con_b = run(a.url, a.requests, a.concurrency, a.steps, a.size)
    print(f"sequential:        {seq:7.2f} req/s  (mean batch {statistics.mean(seq_b):.2f} requests)")
    print(f"concurrency {a.concurrency:<5} {con:7.2f} req/s  (mean batch {statistics.mean(con_b):.2f} requests)")
    print(f"ratio concurrent/sequential: {con / seq:.2f}x  ({a.requests} requests, {a.steps} steps, {a.size}px)")


if __name__ == "__main__":
    main()
