"""The service under overload: admitted throughput and how fast the excess is refused.

    python bench/overload.py                      # starts its own tiny service on 127.0.0.1 (Ray, CPU)
    python bench/overload.py --url http://127.0.0.1:8000 --admitted 32   # a running service (no API key)

Closed loop: `clients` threads each send requests back to back for `--duration` seconds or `--max-requests`
in all, whichever comes first. Three runs: as many clients as the service admits (the baseline); `--factor`
times as many, a refused client retrying at once (the worst case); the same, refused clients waiting the
Retry-After they were given. The load generator runs on the same machine as a local service. Prints, per run: status counts,
admitted req/s (200s per second of the run), latency p50/p95 of the 200s and of the 503s, and /healthz
latency measured during the run. A benchmark, never a test: run it alone on the machine.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BODY = {"prompt": "ein roter Hund läuft am Strand", "seed": 0}


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run(url: str, clients: int, duration: float, max_requests: int, backoff: bool = False) -> dict:
    lock, stop = threading.Lock(), time.perf_counter() + duration
    seen: list[tuple[int, float]] = []  # (status, seconds)
    health: list[float] = []

    def client():
        s = requests.Session()
        while time.perf_counter() < stop:
            with lock:
                if len(seen) >= max_requests:
                    return
            t = time.perf_counter()
            r = s.post(f"{url}/v1/generate", json=BODY, timeout=300)
            with lock:
                seen.append((r.status_code, time.perf_counter() - t))
            if backoff and r.status_code == 503:  # a polite client: wait as told
                time.sleep(min(float(r.headers.get("Retry-After", "1")), max(0.0, stop - time.perf_counter())))

    def prober():
        while time.perf_counter() < stop:
            t = time.perf_counter()
            requests.get(f"{url}/healthz", timeout=30).raise_for_status()
            health.append(time.perf_counter() - t)
            time.sleep(0.5)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=prober)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    codes = Counter(c for c, _ in seen)
    ok = [dt for c, dt in seen if c == 200]
    shed = [dt for c, dt in seen if c == 503]
    return {"clients": f"{clients}{' (Retry-After)' if backoff else ''}", "wall_s": wall, "codes": dict(codes), "admitted_rps": len(ok) / wall,
            "ok_p50": pct(ok, 0.5), "ok_p95": pct(ok, 0.95), "rej_p50": pct(shed, 0.5), "rej_p95": pct(shed, 0.95),
            "health_p50": pct(health, 0.5), "health_max": max(health, default=float("nan"))}


def start_local(ongoing: int, queued: int, steps: int, size: int) -> str:
    """Tiny models in a temp folder, Ray on 2 CPUs, the app on a free loopback port."""
    from ray import serve

    sys.path.insert(0, str(ROOT))  # `serve` is this repo's package
    from mtn.tiny.sd import build_tiny_sd_pipeline
    from mtn.tiny.translator import build_tiny_translator
    from mtn.train.cluster import init_ray
    from serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="mtn-overload-"))
    build_tiny_sd_pipeline(seed=0).save_pretrained(tmp / "tiny-sd")
    build_tiny_translator(seed=0).save(tmp / "translator", bundle_source_encoder=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {"pipeline": str(tmp / "tiny-sd"), "translators": {"multi": str(tmp / "translator")},
            "hybrid_route": "multi", "fallback_route": "multi", "device": "cpu", "dtype": "float32",
            "defaults": {"num_inference_steps": steps, "guidance_scale": 5.0, "width": size, "height": size},
            "batching": {"max_batch_size": ongoing, "batch_wait_timeout_s": 0.05},
            "admission": {"max_queued_requests": queued, "retry_after_s": 1}}
    init_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args, generator_options={"max_ongoing_requests": ongoing}), name="mtn", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running service; default: start a tiny one here")
    p.add_argument("--ongoing", type=int, default=4, help="Generator max_ongoing_requests (local service)")
    p.add_argument("--queued", type=int, default=4, help="admission.max_queued_requests (local service)")
    p.add_argument("--admitted", type=int, help="what the service at --url admits (replicas x ongoing + queued)")
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-requests", type=int, default=5000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    if a.url:
        if not a.admitted:
            sys.exit("error: --admitted is needed with --url")
        url, admitted = a.url, a.admitted
    else:
        url, admitted = start_local(a.ongoing, a.queued, a.steps, a.size), a.ongoing + a.queued
    run(url, 2, 3.0, 50)  # warm-up: translator loaded, kernels compiled
    print(f"service admits {admitted} requests; {a.steps} steps, {a.size}px; closed loop, {a.duration:g} s per run")
    for clients, backoff in ((admitted, False), (a.factor * admitted, False), (a.factor * admitted, True)):
        r = run(url, clients, a.duration, a.max_requests, backoff)
        print(f"clients {r['clients']}: {r['codes']}  admitted {r['admitted_rps']:.2f} req/s  "
              f"200 p50/p95 {r['ok_p50']:.3f}/{r['ok_p95']:.3f} s  503 p50/p95 {r['rej_p50']:.3f}/{r['rej_p95']:.3f} s"
              f"  /healthz p50/max {r['health_p50']:.3f}/{r['health_max']:.3f} s", flush=True)
        bad = {c: n for c, n in r["codes"].items() if c not in (200, 503)}
        if bad:
            print(f"  unexpected statuses: {bad}")
    if not a.url:
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
