"""Sweep helpers (search space, table, plot, best trial) and the sweep job end to end on tiny models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtn.errors import MTNError
from mtn.sweep import SweepConfig, best_row, plot_metric_vs_lr, results_table, search_space

ROOT = Path(__file__).parents[1]
ROWS = [{"trial": "a", "status": "ok", "lr": 1e-3, "num_modules": 3, "val/r@1": 0.5, "val/margin_token_mse_pct": 2.0},
        {"trial": "b", "status": "ok", "lr": 3e-4, "num_modules": 5, "val/r@1": 0.7, "val/margin_token_mse_pct": -1.0},
        {"trial": "c", "status": "error", "lr": 2e-3, "num_modules": 5, "val/r@1": None, "error": "boom | x"}]


def test_search_space_axes():
    space = search_space(SweepConfig(num_modules="3,5", hidden_dims="32,64"))
    assert space["num_modules"] == {"grid_search": [3, 5]} and space["hidden_dim"] == {"grid_search": [32, 64]}
    assert space["lr"].lower == pytest.approx(1e-4) and "loss_rec" not in space
    with pytest.raises(MTNError, match="not a comma list of integers"):
        SweepConfig(num_modules="three")
    with pytest.raises(MTNError, match="lr_min <= lr_max"):
        SweepConfig(lr_min=1e-2, lr_max=1e-3)


def test_table_plot_and_best(tmp_path):
    csv_text, md = results_table(ROWS)
    assert csv_text.splitlines()[0].startswith("trial,status,lr") and len(csv_text.splitlines()) == 4
    assert md.count("\n") == 5 and "boom / x" in md
    assert plot_metric_vs_lr(ROWS[:2], "val/r@1", tmp_path / "p.png").stat().st_size > 1000
    assert best_row(ROWS, "val/r@1", "max")["trial"] == "b"
    assert best_row(ROWS, "val/r@1", "min")["trial"] == "a"
    assert best_row(ROWS[2:], "val/r@1", "max") is None


@pytest.mark.slow
def test_sweep_job_parent_and_nested_runs_table_and_registry(tmp_path):
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "sweep"
    p = subprocess.run([sys.executable, str(ROOT / "jobs/sweep_mtn.py"), f"output_dir={out}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert (out / "results.csv").is_file() and (out / "metric_vs_lr.png").stat().st_size > 1000
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mtn-sweep").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {"results.csv", "results.md", "metric_vs_lr.png"} <= {a.path for a in client.list_artifacts(
        parents[0].info.run_id)}
    assert parents[0].data.tags["mtn.registered_model"] == "models:/mtn-translator-local/1"
