"""Ray Tune sweeps over the MTN training job: the sweep's own config, the search space, results table and plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

from mtn.config import Floats, Ints, Overrides, RunConfig


class SweepConfig(RunConfig):
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir", "storage_path")

    name: str = "mtn-sweep-local"
    base_config: str = "jobs/configs/local.yaml"  # the training config every trial starts from
    base_overrides: Overrides = []  # [key=value, ...] applied to the base config for every trial
    output_dir: str = "outputs/sweep-local"
    # --- search space
    lr_min: float = 1.0e-4
    lr_max: float = 3.0e-3
    num_modules: Ints = [3, 5]  # residual-module counts
    hidden_dims: Ints = []  # optional axis: MTN widths; [] keeps the base config's
    loss_rec: Floats = []  # optional axes: loss weights
    loss_adv: Floats = []
    # named override sets crossed with the axes above, {name: [key=value, ...]}, e.g. the loss ablation
    # {mse: [loss_rec=0], +rec: [loss_rec=0.1]}. A variant that changes an encoder key gets its own feature cache.
    variants: dict[str, Overrides] = {}
    num_samples: int = 4  # trials (grid axes are crossed with this many lr samples each round)
    seed: int = 0
    # --- early stopping (ASHA on the metric every val report)
    metric: str = "val/r@1"
    mode: str = "max"  # max | min
    early_stop: bool = True  # ASHA; false runs every trial to max_steps (ablations compare full runs)
    grace_period: int = 1  # validation reports before a trial may be stopped
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs allow
    # --- quality gate + registry
    gate_margin_pct: float = 0.0  # best trial must beat the linear map's val token MSE by this many percent
    register_model: str | None = "mtn-translator"  # MLflow registered model name; null: never register
    # --- tracking / cluster
    mlflow_experiment: str = "mtn-sweep"
    storage_path: str = "{output_dir}/tune"
    ray_address: str | None = None

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (0 < self.lr_min <= self.lr_max, "need 0 < lr_min <= lr_max"),
            (self.mode in ("max", "min"), f"mode must be max|min, got {self.mode!r}"),
            (self.num_samples >= 1 and self.reduction_factor >= 2 and self.grace_period >= 1,
             "num_samples >= 1, reduction_factor >= 2, grace_period >= 1"),
            (bool(self.num_modules), "num_modules needs at least one value"),
            (all(name.strip() for name in self.variants), "variant names must not be empty"),
        ]

    def variant_map(self) -> dict[str, list[str]]:
        """variants -> {name: [key=value, ...]}; {"": []} when there are none."""
        return dict(self.variants) or {"": []}


# a variant overriding one of these changes what the frozen encoders output, so it needs its own feature cache
ENCODER_KEYS = ("source_encoder", "source_max_length", "source_prefix", "source_subfolder", "source_revision",
                "target_encoder", "target_max_length", "target_prefix", "target_subfolder", "target_revision", "corpus",
                "source_file", "target_file", "max_train_samples")


def needs_own_features(overrides: list[str]) -> bool:
    return any(o.partition("=")[0] in ENCODER_KEYS for o in overrides)


def search_space(cfg: SweepConfig) -> dict:
    from ray import tune

    lr = cfg.lr_min if cfg.lr_min == cfg.lr_max else tune.loguniform(cfg.lr_min, cfg.lr_max)  # lr_min == lr_max: fixed
    space = {"lr": lr, "num_modules": tune.grid_search(cfg.num_modules)}
    for key, values in (("hidden_dim", cfg.hidden_dims), ("loss_rec", cfg.loss_rec), ("loss_adv", cfg.loss_adv)):
        if values:
            space[key] = tune.grid_search(values)
    if list(cfg.variant_map()) != [""]:
        space["variant"] = tune.grid_search(list(cfg.variant_map()))
    return space


COLUMNS = ["trial", "status", "variant", "lr", "num_modules", "hidden_dim", "loss_rec", "loss_adv", "steps", "val/r@1",
           "val/token_mse", "val/pooled_cosine", "val/linear_token_mse", "val/margin_token_mse_pct", "translator", "error"]


def results_table(rows: list[dict]) -> tuple[str, str]:
    """rows (one per trial) -> (CSV text, Markdown text)."""
    from mtn.eval.report import tables

    return tables([{**r, "error": (r.get("error") or "")[:80]} for r in rows], COLUMNS)


def metric_lines(rows: list[dict], metric: str) -> dict[str, list[tuple[float, float, int]]]:
    """{line label: [(lr, metric, steps), ...] by lr}: one line per (variant, residual-module count) with a finite
    metric; what plot_metric_vs_lr draws."""
    lines = {}
    for variant, modules in sorted({(r.get("variant") or "", r["num_modules"]) for r in rows}):
        pts = sorted((r["lr"], r[metric], r.get("steps") or 0) for r in rows if r["num_modules"] == modules
                     and (r.get("variant") or "") == variant and _finite(r.get(metric)))
        if pts:
            lines[f"{variant + ', ' if variant else ''}{modules} RM"] = pts
    return lines


def plot_metric_vs_lr(rows: list[dict], metric: str, path: str | Path) -> Path:
    """The metric against lr (log axis), one line per (variant, residual-module count). Trials stopped early
    (fewer steps than the longest) are hollow and labelled with their step: their value is not a final one.
    The linear baseline, when the trials measured it, is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    full = max((r.get("steps") or 0 for r in rows), default=0)
    for label, pts in metric_lines(rows, metric).items():
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for lr, value, steps in pts:
            if steps < full:
                ax.plot([lr], [value], marker="o", markersize=9, markerfacecolor="white", color=line.get_color())
                ax.annotate(f"stopped @ {steps}", (lr, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    linear = [r["val/linear_token_mse"] for r in rows if _finite(r.get("val/linear_token_mse"))]
    if metric == "val/token_mse" and linear:
        ax.axhline(sum(linear) / len(linear), color="gray", linestyle="--", label="linear baseline")
    ax.set(xscale="log", xlabel="learning rate", ylabel=metric, title=f"{metric} vs lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok" and _finite(r.get(metric))]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r[metric])
