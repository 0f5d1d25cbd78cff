"""The real Ray Serve app on a free 127.0.0.1 port, for the tests that talk HTTP to it."""

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
# Ray's metrics reach the export port every metrics_report_interval_ms (10 s by default); a Ray started here
# reports every second, so a test sees its requests counted soon (a Ray already running keeps its interval)
FAST_METRICS = {"RAY_metrics_report_interval_ms": "1000"}


@dataclass(frozen=True)
class Served:
    url: str  # the Serve HTTP proxy
    metrics_url: str  # this Ray node's Prometheus endpoint: ray_serve_* and the app's ray_mtn_* metrics
    logs_dir: Path | None  # Serve's log files of the app (JSON records), when serve_on_loopback was given one


@contextmanager
def serve_on_loopback(app, logs_dir: Path | None = None):
    """Run a bound Serve application on a local Ray (2 CPUs; a running one is joined and left up); yield a Served.
    `logs_dir`: the app logs JSON records there (Serve's logging_config), else Ray's default text logs."""
    import ray
    from ray import serve

    from mtn.train.cluster import ray_session

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mock.patch.dict(os.environ, FAST_METRICS), ray_session(num_cpus=2, include_dashboard=False):
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            logging_config = {"encoding": "JSON", "logs_dir": str(logs_dir)} if logs_dir else None
            serve.run(app, name="mtn", route_prefix="/", logging_config=logging_config)
            node = next(n for n in ray.nodes() if n["Alive"])  # one node: the metrics of every replica
            yield Served(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{node['MetricsExportPort']}/metrics",
                         logs_dir)
        finally:
            serve.shutdown()
