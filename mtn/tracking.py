"""MLflow tracking for rank 0 of a job, and the loss-curve plot.

A run is resumed (same run id, kept in the checkpoint) after a restart, so one training = one MLflow run.
Secrets never reach MLflow: params come from the config, which holds no credentials.
"""

from __future__ import annotations

import os
from pathlib import Path


class MLflowTracker:
    def __init__(self, cfg, run_id: str | None = None, job: str = "train_mtn"):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        exp = mlflow.get_experiment_by_name(cfg.mlflow_experiment)
        if exp is None:
            # a local store keeps artifacts next to the DB, not in ./mlruns of whatever cwd a worker has
            local = cfg.mlflow_tracking_uri.startswith(("sqlite:", "file:", "/"))
            where = Path(cfg.output_dir, "mlartifacts").as_uri() if local and "://" not in cfg.output_dir else None
            exp_id = mlflow.create_experiment(cfg.mlflow_experiment, artifact_location=where)
        else:
            exp_id = exp.experiment_id
        if run_id:
            self.run = mlflow.start_run(run_id=run_id)
        else:
            self.run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.name)
            mlflow.log_params({k: ("" if v is None else v) for k, v in cfg.to_dict().items()})
            mlflow.set_tags({"mtn.job": job, "mtn.host": os.uname().nodename})
            if getattr(cfg, "mlflow_parent_run_id", None):  # shown nested under the sweep's run in the MLflow UI
                mlflow.set_tag("mlflow.parentRunId", cfg.mlflow_parent_run_id)
        self.run_id = self.run.info.run_id

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if k != "step"}
        self.mlflow.log_metrics(clean, step=step)

    def finish(self, translator_dir: Path, plot: Path | None, final_metrics: dict) -> None:
        if plot is not None:
            self.mlflow.log_artifact(str(plot))
        self.mlflow.log_artifacts(str(translator_dir), artifact_path="translator")
        self.mlflow.log_dict(final_metrics, "metrics.json")
        self.mlflow.end_run()


def register_folder(mlflow, name: str, run_id: str, artifact_path: str) -> str:
    """Register an artifact folder of a run (a diffusers pipeline, a translator) as a new version of `name`;
    -> "models:/<name>/<version>", which serve/ and mtn.uris.fetch_folder accept."""
    client = mlflow.MlflowClient()
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
