"""MLflow tracking, kept off the critical path of training, and the loss-curve plot.

`RunTracker` is rank 0's MLflow run in the training jobs. Every MLflow call goes through one guard
(mtn/train/guard.py: bounded retries, then one warning per outage and probes until the server is back); metric
points are buffered while it is down (bounded; the overflow is counted and reported as dropped) and sent when a
later probe finds the server back; other calls (tags, images) are skipped and counted. A run is resumed (same
run id, kept in the checkpoint) after a restart, so one training = one MLflow run. A new run records the job that
made it, its training data and the machine's load (mtn/train/run_metadata.py: source tags, an `mlflow.data`
input, system metrics sampled off the network and sent with the training metrics).

`upload_outputs` is the driver's last step, after the final checkpoint and the publish: plain artifacts, the
trained model logged as an MLflow model (mtn/mlflow_models: a pyfunc under the run's "Logged models"), its
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
import shlex
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from mtn.train.guard import UPLOAD_HTTP, Guarded, env_defaults, quick_http_env, redact
from mtn.train.run_metadata import SYSTEM_METRICS_S, SystemSampler, source_tags, training_input

BATCH = 1000  # MLflow's limit of metrics per log_batch (100 for params)


class RunTracker:
    """Rank 0's MLflow run, best effort: nothing here raises or blocks training for long (see the module doc).
    `run_id`: resume that run (from the checkpoint); None creates one, lazily retried while the server is down.
    `client`: an MlflowClient-like object (tests); `max_buffer`: metric points kept while the server is down;
    `system_metrics_s`: seconds between system-metric samples (None: none)."""

    def __init__(self, cfg, run_id: str | None = None, job: str = "train_mtn", client=None,
                 max_buffer: int = 100_000, system_metrics_s: float | None = SYSTEM_METRICS_S, **guard_kw):
        quick_http_env()
        if client is None:
            from mlflow import MlflowClient

            client = MlflowClient(cfg.mlflow_tracking_uri)
        self.cfg, self.job, self.client, self.run_id = cfg, job, client, run_id
        self.guard = Guarded(redact(cfg.mlflow_tracking_uri), **guard_kw)
        self.pending: deque = deque()  # mlflow.entities.Metric, oldest first
        self.max_buffer, self.dropped, self.skipped = max_buffer, 0, 0
        self.ready, self.disabled = False, False  # ready: the run exists and is RUNNING on the server
        self.last_step = 0  # the x of system-metric samples: the training step they were taken at (or after)
        self.sampler = SystemSampler(system_metrics_s, log=self.guard.log) if system_metrics_s else None
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
        tags = source_tags(self.job)
        if getattr(cfg, "mlflow_parent_run_id", None):  # shown nested under the sweep's run in the MLflow UI
            tags["mlflow.parentRunId"] = cfg.mlflow_parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=cfg.name, tags=tags).info.run_id
        params = [Param(k, str("" if v is None else v)) for k, v in cfg.to_dict().items()]
        for i in range(0, len(params), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        dataset = self._training_input()
        if dataset is not None:
            self.client.log_inputs(self.run_id, datasets=[dataset])

    def _training_input(self):
        """The data as an MLflow dataset input; a config it cannot describe costs a warning, not the run."""
        try:
            return training_input(self.cfg)
        except Exception as e:  # noqa: BLE001 - metadata only: the run goes on without it
            self.guard.log(f"warning: the training data is not recorded in MLflow ({type(e).__name__}: {e})")
            return None

    # ------------------------------------------------------------------------------------------- logging
    def log_metrics(self, metrics: dict, step: int) -> None:
        """Queue the step's numbers ('step' itself is the x axis) and send what is queued, unless down."""
        self._take_samples()  # taken before this step's metrics: they belong to the previous step
        self.last_step = step
        self._queue(metrics, int(time.time() * 1000), step)
        self.flush()

    def _take_samples(self) -> None:
        for when_ms, values in self.sampler.drain() if self.sampler else ():
            self._queue(values, when_ms, self.last_step)

    def _queue(self, metrics: dict, when_ms: int, step: int) -> None:
        from mlflow.entities import Metric

        for k, v in metrics.items():
            if k != "step":
                if len(self.pending) >= self.max_buffer:
                    self.pending.popleft()
                    self.dropped += 1
                self.pending.append(Metric(k.replace("@", "_at_"), float(v), when_ms, step))

    def flush(self, force: bool = False) -> int:
        """Send queued metric points (system metrics sampled since the last flush included), oldest first;
        -> how many are still queued."""
        self._take_samples()
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
        if self.sampler:
            self.sampler.stop()
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
def upload_outputs(tracking_uri: str, run_id: str | None, artifacts: dict[str, str],
                   model: dict[str, str] | None = None, register: str | None = None, experiment: str = "mtn",
                   run_name: str = "mtn", attempts: int = 3, backoff_s: float = 2.0,
                   alias: str | None = None) -> str | None:
    """After the publish: log `artifacts` ({artifact path in the run: local file/folder or fsspec URL}) to the run;
    log `model` as an MLflow model of the run ({"translator": folder} -> a translator, {"pipeline": folder} or
    {"pipeline": folder, "translator": folder} -> a finetuned pipeline; mtn/mlflow_models); register it as a new version of model
    `register` (when given; a translator's version is tagged with its target space, mtn.target_*) and move `alias`
    to it; end the run FINISHED. -> "ok", or None after printing a warning with the command
    that retries it. Never raises."""
    guard = Guarded(redact(tracking_uri), attempts=attempts, backoff_s=backoff_s,
                    note=f"gave up after {attempts} tries")
    with env_defaults(UPLOAD_HTTP):
        status, value = guard.call("upload the outputs", _upload, tracking_uri, run_id, artifacts, model or {},
                                   register, experiment, run_name, alias)
    if status == "ok":
        run_id, logged, uri = value
        sys.stdout.write(f"MLflow: outputs uploaded to run {run_id}" + (f"; logged model {logged}" if logged else "")
                         + (f"; registered as {uri}\n" if uri else "\n"))
        sys.stdout.flush()  # not print: Ray's progress-bar manager may still patch it
        return "ok"
    cmd = [sys.executable, "-m", "mtn.train.tracking", "upload", "--tracking-uri", redact(tracking_uri)]
    cmd += ["--run-id", run_id] if run_id else ["--experiment", experiment, "--run-name", run_name]
    cmd += [a for name, src in artifacts.items() for a in ("--artifact", f"{name}={src}")]
    cmd += [a for name, src in (model or {}).items() for a in ("--model", f"{name}={src}")]
    if register:
        cmd += ["--register", register] + (["--alias", alias] if alias else [])
    print("warning: the MLflow upload failed (see above); the outputs ARE published and the job succeeded. "
          "Retry the upload with:\n  " + shlex.join(cmd), file=sys.stderr, flush=True)
    return None


def _upload(tracking_uri, run_id, artifacts, model, register, experiment, run_name, alias=None):
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
        folders = {k: stack.enter_context(_local_copy(v)) for k, v in model.items()}
        info = _log_model(run_id, folders, tracking_uri) if model else None
        tags = None
        if register and set(folders) == {"translator"}:  # the text space, checkable without a download
            from mtn.translator import read_target_space, target_space_tags

            tags = target_space_tags(read_target_space(folders["translator"]))
    uri = None
    if register and info is not None:
        from mtn.mlflow_models import register as register_model

        uri = register_model(client, register, info, alias=alias, tags=tags)
        client.set_tag(run_id, "mtn.registered_model", uri)
    client.set_terminated(run_id, "FINISHED")
    return run_id, info.model_uri if info else None, uri


def _log_model(run_id: str, folders: dict[str, Path], tracking_uri: str):
    from mtn.errors import MTNError
    from mtn.mlflow_models import log_pipeline, log_translator

    if set(folders) == {"translator"}:
        return log_translator(run_id, folders["translator"], tracking_uri=tracking_uri)
    if "pipeline" in folders and set(folders) <= {"pipeline", "translator"}:
        return log_pipeline(run_id, folders["pipeline"], folders.get("translator"), tracking_uri=tracking_uri)
    raise MTNError(f"a model is a translator, or a pipeline (+ its translator), not {sorted(folders)}")


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
            self.run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.name, tags=source_tags(job))
            mlflow.log_params({k: ("" if v is None else v) for k, v in cfg.to_dict().items()})
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
    up.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                    help="log as the run's MLflow model: translator=SOURCE, or pipeline=SOURCE and translator=SOURCE")
    up.add_argument("--register", metavar="NAME", help="register the logged model as registered model NAME")
    up.add_argument("--alias", metavar="ALIAS", help="with --register: move this alias (e.g. champion) to the version")
    args = p.parse_args(argv)
    pairs = [a.split("=", 1) for a in args.artifact + args.model]
    if not args.tracking_uri or any(len(x) != 2 or not all(x) for x in pairs) or (args.register and not args.model):
        print("error: give --tracking-uri (or $MLFLOW_TRACKING_URI), PATH=SOURCE / NAME=SOURCE pairs, and --model "
              "with --register", file=sys.stderr)
        return 2
    artifacts, model = dict(pairs[:len(args.artifact)]), dict(pairs[len(args.artifact):])
    ok = upload_outputs(args.tracking_uri, args.run_id, artifacts, model, args.register, args.experiment,
                        args.run_name, alias=args.alias)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
