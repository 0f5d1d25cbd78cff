"""A local `ray start --head` in token mode, as KubeRay starts a head with authOptions token, on ports of its own
(never colliding with another Ray on the machine): for the tests that drive the `ray` CLI against a real cluster."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
OWN_PORTS = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def token_head(env: dict, num_cpus: int) -> Iterator[str]:
    """Run a head with `env` (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in it); yield its dashboard address once its
    job server answers (at most 120 s); stop exactly this cluster afterwards."""
    assert env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN"), "a token-mode head needs its token"
    dash = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    # --block keeps `ray start` in the foreground: terminating it stops exactly this cluster (no global `ray stop`)
    head = subprocess.Popen([RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={ray_tmp}",
                             "--disable-usage-stats", *(f"--{name}={free_port()}" for name in OWN_PORTS)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None, "`ray start --head` exited: " + head.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the Ray job server did not answer within 120 s"
            time.sleep(1)
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
