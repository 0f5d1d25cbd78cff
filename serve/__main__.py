"""`python -m serve`: the service on 127.0.0.1:8000 with the embedded default (tiny models, CPU).

    python -m serve                                   # tiny SD pipeline + the default job's translator
    python -m serve --port 8080 --host 0.0.0.0
    python -m serve --config serve/config.yaml        # the first application's args of a serve-build YAML
    MTN_API_KEYS=k1,k2 python -m serve                # /v1/* then needs `Authorization: Bearer k1` (or k2)
    python -m serve --metrics-port 8080               # Prometheus metrics at http://127.0.0.1:8080/metrics

The default translator is outputs/local/translator, trained by the train job first when missing
(jobs/bootstrap.py; BENCHMARKS.md has its time); the tiny pipeline is built from configs into outputs/serve/tiny-sd.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mtn.config import IN_CHECKOUT, REPO_ROOT

ROOT = REPO_ROOT if IN_CHECKOUT else Path.cwd()  # the demo's outputs/: the checkout, else the working directory


def default_args(root: Path = ROOT) -> dict:
    """App args for the tiny demo: English -> the pipeline's own (tiny CLIP) encoder; every other language and
    mixed prompts -> the one translator the default job trains (tiny T5 bytes, so any script tokenizes)."""
    return {
        "pipeline": str(root / "outputs/serve/tiny-sd"),
        "translators": {"multi": str(root / "outputs/local/translator")},
        "english_route": "native", "hybrid_route": "multi", "fallback_route": "multi",
        "device": "cpu", "dtype": "float32",
        "limits": {"max_width": 256, "max_height": 256, "max_steps": 50, "max_images": 4},
        "defaults": {"num_inference_steps": 10, "guidance_scale": 5.0, "width": 64, "height": 64},
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    }


def prepare_default(args: dict) -> None:
    """Build the tiny pipeline / train the default translator when they are missing (never overwrites)."""
    pipe_dir = Path(args["pipeline"])
    if not (pipe_dir / "model_index.json").is_file():
        from mtn.tiny.sd import build_tiny_sd_pipeline

        print(f"building the tiny Stable Diffusion pipeline -> {pipe_dir}", flush=True)
        build_tiny_sd_pipeline().save_pretrained(pipe_dir)
    from jobs.bootstrap import ensure_default_translator
    from mtn.errors import MTNError

    try:
        ensure_default_translator(args["translators"]["multi"])
    except MTNError as e:
        sys.exit(f"error: {e}")


def args_from_config(path: str | None, overrides: list[str] | None = None, default: dict | None = None) -> dict:
    """The app args of a serve-build YAML (or `default`) with key=value overrides; a bad one exits with one line."""
    from mtn.errors import MTNError
    from serve.config import load_app_args

    try:
        return load_app_args(path, overrides, default)
    except MTNError as e:
        sys.exit(f"error: {e}")


def logging_config_of(path: str | None) -> dict | None:
    """applications[0].logging_config of a serve-build YAML (Ray Serve's LoggingConfig: encoding JSON|TEXT,
    log_level, ...), or None: Serve's default (text)."""
    if path is None:
        return None
    from mtn.config import read_yaml

    return read_yaml(path)["applications"][0].get("logging_config")


def metrics_url(host: str) -> str:
    """This node's Prometheus endpoint (Ray's metrics export port): ray_serve_* and the app's ray_mtn_* metrics."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == node_id)
    return f"http://{host}:{port}/metrics"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--config", help="serve-build YAML; its first application's args replace the tiny default")
    p.add_argument("--metrics-port", type=int, help="Ray's Prometheus metrics port on a Ray started here "
                   "(default: a free one; the URL is printed)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="app args overrides, e.g. limits.max_steps=20")
    ns = p.parse_args(argv)

    from pydantic import ValidationError

    from serve.config import AppArgs

    args = args_from_config(ns.config, ns.overrides, None if ns.config else default_args())
    try:
        app_args = AppArgs.model_validate(args)
    except ValidationError as e:
        sys.exit(f"error: invalid app args: {e}")
    from mtn.errors import MTNError
    from serve.web import load_api_keys

    try:  # the Ingress checks again in its replica; here a missing key is one line, not a failed deployment
        keys = load_api_keys(app_args.auth)
    except MTNError as e:
        sys.exit(f"error: {e}")
    if not ns.config:
        prepare_default(args)

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    from ray import serve

    from mtn.train.cluster import init_ray
    from serve.app import build_app

    metrics = {"_metrics_export_port": ns.metrics_port} if ns.metrics_port else {}
    init_ray(include_dashboard=False, **metrics)  # $RAY_ADDRESS or a local Ray (mtn/train/cluster.py)
    # the proxy's own timeout (a plain 408) only backs up the app's JSON 504 (admission.request_timeout_s)
    serve.start(http_options={"host": ns.host, "port": ns.port,
                              "request_timeout_s": app_args.admission.request_timeout_s + 30})
    serve.run(build_app(args), name="mtn", route_prefix="/", logging_config=logging_config_of(ns.config))
    print(f"MTN service ready on http://{ns.host}:{ns.port}/  (API docs: /docs; API keys: "
          f"{'required on /v1/*' if keys else 'off'}; metrics: {metrics_url(ns.host)}; Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
