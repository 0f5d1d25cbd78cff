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


@contextmanager
def mtn_serve_process(args: list[str], env: dict, cwd: Path, ready_timeout_s: float = 420.0):
    """`mtn serve <args>` as a user runs it, in its own process group on a free port; yield its base URL once it
    prints "MTN service ready"; Ctrl-C (serve.shutdown, then Ray goes with the process) afterwards. A start that
    fails or hangs fails the test with the end of the service's output."""
    import queue
    import signal
    import subprocess
    import sys
    import threading
    import time

    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mtn = Path(sys.executable).parent / "mtn"
    proc = subprocess.Popen([str(mtn), "serve", "--port", str(port), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not any("MTN service ready" in line for line in seen):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                pytest.fail("mtn serve did not get ready; its output ends with:\n" + "".join(seen[-40:]))
            seen.append(line)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
