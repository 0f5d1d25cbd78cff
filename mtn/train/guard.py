"""Calls to an MLflow server that may be down, kept off the critical path (training, a job's last step).

`Guarded.call` retries a failed call a few times with backoff (seconds: MLflow's own HTTP retries, which can block
for minutes, are switched down for the process by `quick_http_env`), then takes the server as down: one warning
per outage, and calls return at once without touching the network until a probe finds it back. A call the
server answers with a 4xx is refused, not an outage. URIs are printed with any user:password removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable

# per request: no MLflow-internal retries (our wrapper retries, with a bound) and a short timeout, so that an
# unreachable server costs seconds; the job's environment may set other values (they win)
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
UPLOAD_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}  # big files


def quick_http_env(values: dict[str, str] = QUICK_HTTP) -> None:
    """Make MLflow's HTTP client fail fast in this process (read by MLflow at each request)."""
    for k, v in values.items():
        os.environ.setdefault(k, v)


def redact(uri: str | None) -> str:
    """The URI without user:password (never print credentials)."""
    return re.sub(r"//[^/@]+@", "//***@", uri or "")


def _rejected(e: BaseException) -> bool:
    """The server answered and refused the call (4xx): retrying cannot help, and the server is not down."""
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and 400 <= e.get_http_status_code() < 500


class Guarded:
    """Calls to a server that may be down: retry with backoff, then 'down' (warned once) until a probe works.
    While down, calls return at once without touching the network, except a probe every `probe_s` (doubling up
    to `max_probe_s`)."""

    def __init__(self, where: str, attempts: int = 3, backoff_s: float = 0.5, probe_s: float = 5.0,
                 max_probe_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] | None = None,
                 note: str = "training goes on; metrics are buffered and sent when a probe finds it back"):
        self.where, self.attempts, self.backoff_s, self.note = where, attempts, backoff_s, note
        self.probe_s, self.max_probe_s, self.clock, self.sleep = probe_s, max_probe_s, clock, sleep
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.down_since: float | None = None
        self.next_probe, self.interval = 0.0, probe_s
        self.warned_rejects: set[str] = set()

    def call(self, what: str, fn: Callable, *args, force: bool = False, **kwargs) -> tuple[str, object]:
        """-> ("ok", value) | ("down", None) | ("rejected", None). `force`: try even between probes."""
        if self.down_since is not None and not force and self.clock() < self.next_probe:
            return "down", None
        tries = 1 if self.down_since is not None else self.attempts  # a probe is a single try
        for i in range(tries):
            try:
                value = fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure of the tracking server must not stop training
                if _rejected(e):
                    if what not in self.warned_rejects:
                        self.warned_rejects.add(what)
                        self.log(f"warning: MLflow refused to {what} ({_short(e)}); skipped")
                    return "rejected", None
                if i + 1 < tries:
                    self.sleep(self.backoff_s * 2**i)
                    continue
                self._went_down(what, e)
                return "down", None
            self._came_back()
            return "ok", value
        raise AssertionError("unreachable")

    def _went_down(self, what: str, e: BaseException) -> None:
        now = self.clock()
        if self.down_since is None:
            self.down_since, self.interval = now, self.probe_s
            self.log(f"warning: MLflow at {self.where} is unreachable ({what}: {_short(e)}); {self.note}")
        else:
            self.interval = min(self.interval * 2, self.max_probe_s)
        self.next_probe = now + self.interval

    def _came_back(self) -> None:
        if self.down_since is not None:
            self.log(f"MLflow at {self.where} is back after {self.clock() - self.down_since:.0f} s")
            self.down_since = None


def _short(e: BaseException) -> str:
    text = redact(" ".join(str(e).split()))
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


@contextlib.contextmanager
def env_defaults(values: dict[str, str]):
    """Set env vars the user has not set, for the duration (MLflow reads them per request)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
