"""Sweep helpers (search space, table, plot, best trial) and the sweep job end to end on tiny models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtn.errors import MTNError
from mtn.sweep import (
    SweepConfig,
    best_row,
    metric_lines,
    needs_own_features,
    plot_metric_vs_lr,
    results_table,
    search_space,
)

ROOT = Path(__file__).parents[1]
ROWS = [{"trial": "a", "status": "ok", "lr": 1e-3, "num_modules": 3, "val/r@1": 0.5, "val/margin_token_mse_pct": 2.0},
        {"trial": "b", "status": "ok", "lr": 3e-4, "num_modules": 5, "val/r@1": 0.7, "val/margin_token_mse_pct": -1.0},
        {"trial": "c", "status": "error", "lr": 2e-3, "num_modules": 5, "val/r@1": None, "error": "boom | x"}]


def test_search_space_axes():
    space = search_space(SweepConfig(num_modules=[3, 5], hidden_dims=[32, 64]))
    assert space["num_modules"] == {"grid_search": [3, 5]} and space["hidden_dim"] == {"grid_search": [32, 64]}
    assert space["lr"].lower == pytest.approx(1e-4) and "loss_rec" not in space
    with pytest.raises(MTNError, match=r"num_modules\[0\] must be int"):
        SweepConfig(num_modules="three")
    with pytest.raises(MTNError, match="lr_min <= lr_max"):
        SweepConfig(lr_min=1e-2, lr_max=1e-3)


def test_variants_and_fixed_lr():
    cfg = SweepConfig(lr_min=1e-3, lr_max=1e-3, num_modules=3,
                      variants={"mse": ["loss_rec=0", "loss_adv=0"], "full": ["loss_rec=0.1", "loss_adv=0.01"],
                                "len77": "source_max_length=77"})
    assert cfg.variant_map() == {"mse": ["loss_rec=0", "loss_adv=0"], "full": ["loss_rec=0.1", "loss_adv=0.01"],
                                 "len77": ["source_max_length=77"]}
    space = search_space(cfg)
    assert space["lr"] == 1e-3 and space["variant"] == {"grid_search": ["mse", "full", "len77"]}
    assert [needs_own_features(v) for v in cfg.variant_map().values()] == [False, False, True]
    assert SweepConfig().variant_map() == {"": []} and "variant" not in search_space(SweepConfig())
    for bad, match in [("a: loss_rec=0", "variants must be a mapping"), ({"a": "x=1 y=2"}, "must be a YAML list"),
                       ({" ": ["x=1"]}, "variant names must not be empty")]:
        with pytest.raises(MTNError, match=match):
            SweepConfig(variants=bad)


def test_table_plot_and_best(tmp_path):
    csv_text, md = results_table(ROWS)
    assert csv_text.splitlines()[0].startswith("trial,status,variant,lr") and len(csv_text.splitlines()) == 4
    assert md.count("\n") == 5 and "boom / x" in md
    rows = [*ROWS, {**ROWS[0], "trial": "d", "lr": 1e-4, "val/r@1": 0.25, "steps": 2}]
    assert metric_lines(rows, "val/r@1") == {"3 RM": [(1e-4, 0.25, 2), (1e-3, 0.5, 0)], "5 RM": [(3e-4, 0.7, 0)]}
    from PIL import Image

    with Image.open(plot_metric_vs_lr(rows, "val/r@1", tmp_path / "p.png")) as png:  # a real PNG, 6.5 x 4.2 in
        assert png.size == (650, 420) and len(png.getcolors(maxcolors=100_000)) > 2
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
    # the registered version holds the best trial's translator, and it loads
    from mtn.translator import load_translator
    from mtn.uris import fetch_folder

    mlflow.set_tracking_uri(f"sqlite:///{out}/mlflow.db")
    folder = fetch_folder("models:/mtn-translator-local/1", "translator.json", cache_dir=tmp_path / "cache")
    assert load_translator(folder).encode(["a red dog"]).shape == (1, 77, 48)
    finished = [line for line in (out / "results.csv").read_text().splitlines()[1:] if "/translator" in line]
    assert finished and all(str(out / "trials") in line for line in finished)
    # promoted: the champion alias loads as a pyfunc model and gives the registered translator's embeddings
    import numpy as np

    champion = mlflow.pyfunc.load_model("models:/mtn-translator-local@champion").predict(["ein Hund"])
    np.testing.assert_allclose(champion, load_translator(folder).encode(["ein Hund"]).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_token_length_ablation_extracts_a_cache_per_length(tmp_path):
    """The paper's token-length ablation config, rebased on the tiny default: one feature cache per source length,
    one trial per length, run to the end (no early stopping), nothing registered."""
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "abl"
    p = subprocess.run([sys.executable, str(ROOT / "jobs/sweep_mtn.py"), "--config",
                        str(ROOT / "jobs/configs/ablations/token_lengths.yaml"), f"output_dir={out}",
                        "base_config=jobs/configs/local.yaml", "variants={len16: [source_max_length=16], len48: [source_max_length=48]}",
                        "base_overrides=[max_steps=6, val_every=3, checkpoint_every=3, hidden_dim=16, "
                        "corpus=generated:200, max_val_samples=40, bundle_source_encoder=false]"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    import json

    for length in (16, 48):
        manifest = json.loads((out / "features" / f"len{length}" / "train" / "manifest.json").read_text())
        assert manifest["source_encoder"]["max_length"] == length
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 3 and {line.split(",")[2] for line in lines[1:]} == {"len16", "len48"}
    assert all(",ok," in line and ",6," in line for line in lines[1:])  # both ran all 6 steps
    assert "registered" not in p.stdout
