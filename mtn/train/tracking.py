"""MLflow tracking, kept off the critical path of training, and the loss-curve plot.

`RunTracker` is rank 0's MLflow run in the training jobs. Every MLflow call goes through one wrapper
(`_Guarded`): a failed call is retried a few times with backoff (seconds: MLflow's own HTTP retries, which can
block for minutes, are switched down for the process by `quick_http_env`), then the server is taken as down:
one warning per outage, metric points are buffered (bounded; the overflow is counted and reported as dropped)
and sent when a later probe finds the server back; other calls (tags, images) are skipped and counted. A run
is resumed (same run id, kept in the checkpoint) after a restart, so one training = one MLflow run.

`upload_outputs` is the driver's last step, after the final checkpoint and the publish: artifacts and model
registration. It never fails the job: a failed upload prints a warning and the command that retries it
(`python -m mtn.train.tracking upload ...`).

`MLflowTracker` is the plain fluent tracker of the evaluate and sweep drivers (errors propagate there).
Secrets never reach MLflow: params come from the config, which holds no credentials; URIs are printed with any
user:password removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

# per request: no MLflow-internal retries (our wrapper retries, with a bound) and a short timeout, so that an
# unreachable server costs seconds; the job's environment may set other values (they win)
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
UPLOAD_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}  # big files
BATCH = 1000  # MLflow's limit of metrics per log_batch (100 for params)


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


class _Guarded:
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


class RunTracker:
    """Rank 0's MLflow run, best effort: nothing here raises or blocks training for long (see the module doc).
    `run_id`: resume that run (from the checkpoint); None creates one, lazily retried while the server is down.
    `client`: an MlflowClient-like object (tests); `max_buffer`: metric points kept while the server is down."""

    def __init__(self, cfg, run_id: str | None = None, job: str = "train_mtn", client=None,
                 max_buffer: int = 100_000, **guard_kw):
        quick_http_env()
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(cfg.mlflow_tracking_uri)
        self.cfg, self.job, self.client, self.run_id = cfg, job, client, run_id
        self.guard = _Guarded(redact(cfg.mlflow_tracking_uri), **guard_kw)
        self.pending: deque = deque()  # mlflow.entities.Metric, oldest first
        self.max_buffer, self.dropped, self.skipped = max_buffer, 0, 0
        self.ready, self.disabled = False, False  # ready: the run exists and is RUNNING on the server
        self._ensure_run(force=True)

    # ------------------------------------------------------------------------------------------- the run
    def _ensure_run(self, force: bool = False) -> bool:
        if self.ready or self.disabled:
            return self.ready
        if self.run_id:  # resumed (or created before params failed): RUNNING again (a preempted run is KILLED)
            status, _ = self.guard.call("resume the run", self.client.update_run, self.run_id, "RUNNING",
                                        force=force)
        else:
            status, _ = self.guard.call("start the run", self._start_run, force=force)
        self.ready = status == "ok" or (status == "rejected" and self.run_id is not None)
        self.disabled = status == "rejected" and self.run_id is None  # refused outright: tracking stays off
        return self.ready

    def _start_run(self) -> None:
        from mlflow.entities import Param

        cfg = self.cfg
        exp_id = experiment_id(self.client, cfg.mlflow_experiment, cfg.mlflow_tracking_uri, cfg.output_dir)
        tags = {"mtn.job": self.job, "mtn.host": os.uname().nodename}
        if getattr(cfg, "mlflow_parent_run_id", None):  # shown nested under the sweep's run in the MLflow UI
            tags["mlflow.parentRunId"] = cfg.mlflow_parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
        params = [Param(k, str("" if v is None else v)) for k, v in cfg.to_dict().items()]
        for i in range(0, len(params), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    # ------------------------------------------------------------------------------------------- logging
    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queue the step's numbers ('step' itself is the x axis) and send what is queued, unless down."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if k != "step":
                if len(self.pending) >= self.max_buffer:
                    self.pending.popleft()
                    self.dropped += 1
                self.pending.append(Metric(k.replace("@", "_at_"), float(v), now, step))
        self.flush()

    def flush(self, force: bool = False) -> int:
        """Send queued metric points, oldest first; -> how many are still queued."""
        before = self.guard.down_since
        while self.pending and self._ensure_run(force):
            chunk = [self.pending[i] for i in range(min(BATCH, len(self.pending)))]
            status, _ = self.guard.call("log metrics", self.client.log_batch, self.run_id, metrics=chunk,
                                        force=force)
            if status == "down":
                break
            for _ in chunk:
                self.pending.popleft()
            if status == "rejected":  # a bad value: these points are lost, the rest still goes
                self.dropped += len(chunk)
        if before is not None and self.guard.down_since is None:
            print(f"MLflow: buffered metric points sent; {len(self.pending)} still queued, {self.dropped} dropped",
                  file=sys.stderr, flush=True)
        return len(self.pending)

    def set_tag(self, key: str, value) -> None:
        self._other("set a tag", lambda: self.client.set_tag(self.run_id, key, str(value)))

    def log_image(self, image, artifact_file: str) -> None:
        """Validation images: skipped (and counted) while the server is down, not buffered."""
        self._other("log an image", lambda: self.client.log_image(self.run_id, image, artifact_file=artifact_file))

    def _other(self, what: str, fn: Callable[[], object]) -> None:
        if not self._ensure_run() or self.guard.call(what, fn)[0] != "ok":
            self.skipped += 1

    def close(self, status: str | None = None) -> dict:
        """End of this process's part: one last (forced) flush; `status` (e.g. KILLED when preempted) ends the
        run, None leaves it RUNNING for the driver's upload. Prints and returns what could not be sent."""
        left = self.flush(force=True)
        if status and self.run_id:
            self.guard.call("end the run", self.client.set_terminated, self.run_id, status, force=True)
        lost = {"metric_points_dropped": self.dropped + left, "calls_skipped": self.skipped}
        if any(lost.values()):
            print(f"warning: MLflow at {self.guard.where} missed {lost['metric_points_dropped']} metric points and "
                  f"{lost['calls_skipped']} other calls of run {self.run_id} (server unreachable); the checkpoint "
                  "and the published outputs are complete", file=sys.stderr, flush=True)
        return lost


def experiment_id(client, name: str, tracking_uri: str, output_dir: str) -> str:
    """The experiment's id, created when missing (a local store keeps artifacts next to the DB, not in ./mlruns
    of whatever cwd a worker has)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = tracking_uri.startswith(("sqlite:", "file:", "/"))
    where = Path(output_dir, "mlartifacts").as_uri() if local and "://" not in output_dir else None
    try:
        return client.create_experiment(name, artifact_location=where)
    except MlflowException:  # created meanwhile by a parallel run (sweep trials)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ----------------------------------------------------------------------------------------------- driver
def upload_outputs(tracking_uri: str, run_id: str | None, artifacts: dict[str, str], register: str | None = None,
                   register_path: str | None = None, experiment: str = "mtn", run_name: str = "mtn",
                   attempts: int = 3, backoff_s: float = 2.0) -> str | None:
    """After the publish: log `artifacts` ({artifact path in the run: local file/folder or fsspec URL}) to the
    run, register `register_path` as a new version of model `register` (when given), end the run FINISHED.
    -> "ok", or None after printing a warning with the command that retries it. Never raises."""
    guard = _Guarded(redact(tracking_uri), attempts=attempts, backoff_s=backoff_s,
                     note=f"gave up after {attempts} tries")
    with _env(UPLOAD_HTTP):
        status, value = guard.call("upload the outputs", _upload, tracking_uri, run_id, artifacts, register,
                                   register_path, experiment, run_name)
    if status == "ok":
        run_id, uri = value
        sys.stdout.write(f"MLflow: outputs uploaded to run {run_id}" + (f"; registered as {uri}\n" if uri else "\n"))
        sys.stdout.flush()  # not print: Ray's progress-bar manager may still patch it
        return "ok"
    cmd = [sys.executable, "-m", "mtn.train.tracking", "upload", "--tracking-uri", redact(tracking_uri)]
    cmd += ["--run-id", run_id] if run_id else ["--experiment", experiment, "--run-name", run_name]
    cmd += [a for name, src in artifacts.items() for a in ("--artifact", f"{name}={src}")]
    if register:
        cmd += ["--register", f"{register}={register_path}"]
    print("warning: the MLflow upload failed (see above); the outputs ARE published and the job succeeded. "
          "Retry the upload with:\n  " + shlex.join(cmd), file=sys.stderr, flush=True)
    return None


def _upload(tracking_uri, run_id, artifacts, register, register_path, experiment, run_name):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if run_id is None:  # the server was unreachable for the whole run: a run for the outputs only
        run_id = client.create_run(experiment_id(client, experiment, tracking_uri, "."), run_name=run_name,
                                   tags={"mtn.note": "created by the upload; the training run was not tracked"}
                                   ).info.run_id
    with contextlib.ExitStack() as stack:
        for name, src in artifacts.items():
            local = stack.enter_context(_local_copy(src))
            if not local.exists():
                continue
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_path=name)
            else:
                parent = str(Path(name).parent)
                client.log_artifact(run_id, str(local), artifact_path=None if parent == "." else parent)
    uri = None
    if register:
        uri = register_folder(client, register, run_id, register_path)
        client.set_tag(run_id, "mtn.registered_model", uri)
    client.set_terminated(run_id, "FINISHED")
    return run_id, uri


@contextlib.contextmanager
def _local_copy(src: str):
    """A local path for a local path or a remote (fsspec) file/folder, downloaded for the upload."""
    if "://" not in src:
        yield Path(src)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(src)
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / Path(root).name
        if fs.exists(root):
            fs.get(root, str(dest), recursive=fs.isdir(root))
        yield dest


@contextlib.contextmanager
def _env(values: dict[str, str]):
    """Set env vars the user has not set, for the duration (MLflow reads them per request)."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


# ----------------------------------------------------------------------------------------------- registry
def register_folder(client, name: str, run_id: str, artifact_path: str) -> str:
    """Register an artifact folder of a run (a diffusers pipeline, a translator) as a new version of `name`;
    -> "models:/<name>/<version>", which serve/ and mtn.uris.fetch_folder accept. `client`: an MlflowClient
    (or the mlflow module, whose MlflowClient() is then used)."""
    if not hasattr(client, "create_model_version"):
        client = client.MlflowClient()
    if not _exists(client, name):
        client.create_registered_model(name)
    run = client.get_run(run_id)
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id)
    return f"models:/{name}/{mv.version}"


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


# ----------------------------------------------------------------------------------------------- fluent
class MLflowTracker:
    """The fluent (active-run) tracker of the evaluate and sweep drivers; errors propagate."""

    def __init__(self, cfg, run_id: str | None = None, job: str = "train_mtn"):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            exp_id = experiment_id(mlflow.MlflowClient(), cfg.mlflow_experiment, cfg.mlflow_tracking_uri,
                                   cfg.output_dir)
            self.run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.name)
            mlflow.log_params({k: ("" if v is None else v) for k, v in cfg.to_dict().items()})
            mlflow.set_tags({"mtn.job": job, "mtn.host": os.uname().nodename})
            if getattr(cfg, "mlflow_parent_run_id", None):  # shown nested under the sweep's run in the MLflow UI
                mlflow.set_tag("mlflow.parentRunId", cfg.mlflow_parent_run_id)
        self.run_id = self.run.info.run_id

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if k != "step"}
        self.mlflow.log_metrics(clean, step=step)


def save_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Training loss terms per step (log scale) and validation metrics, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for h in history for k in h if k.startswith("train/")})
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h and h[k] > 0]
        if pts:
            ax_loss.plot(*zip(*pts, strict=False), label=k.removeprefix("train/"))
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    ax_loss.legend()
    for k in sorted({k for h in history for k in h if k.startswith("val/")}):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax_val.plot(*zip(*pts, strict=False), marker="o", label=k.removeprefix("val/"))
    ax_val.set(xlabel="step", title="validation")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """`python -m mtn.train.tracking upload ...`: the retry a job prints when its MLflow upload failed."""
    p = argparse.ArgumentParser(prog="python -m mtn.train.tracking", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("upload", help="log published outputs to an MLflow run, register, end the run")
    up.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                    help="default: $MLFLOW_TRACKING_URI (put credentials there, not on the command line)")
    up.add_argument("--run-id", help="the training run (printed by the job); omit to create one")
    up.add_argument("--experiment", default="mtn", help="for a new run (no --run-id)")
    up.add_argument("--run-name", default="mtn", help="for a new run (no --run-id)")
    up.add_argument("--artifact", action="append", default=[], metavar="PATH=SOURCE",
                    help="artifact path in the run = local or s3:// file/folder (repeatable)")
    up.add_argument("--register", metavar="NAME=PATH", help="register the run's artifact PATH as model NAME")
    args = p.parse_args(argv)
    pairs = [a.split("=", 1) for a in args.artifact + ([args.register] if args.register else [])]
    if not args.tracking_uri or any(len(x) != 2 or not all(x) for x in pairs):
        print("error: give --tracking-uri (or $MLFLOW_TRACKING_URI) and PATH=SOURCE / NAME=PATH pairs",
              file=sys.stderr)
        return 2
    artifacts = dict(x for x in pairs[:len(args.artifact)])
    reg, reg_path = pairs[-1] if args.register else (None, None)
    ok = upload_outputs(args.tracking_uri, args.run_id, artifacts, reg, reg_path, args.experiment, args.run_name)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
