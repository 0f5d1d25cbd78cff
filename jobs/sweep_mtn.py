"""Ray Tune sweep over the MTN training job: learning rate x residual modules (+ optional width / loss axes).

    python jobs/sweep_mtn.py                                   # jobs/configs/sweep_local.yaml: 4 tiny trials, ASHA
    python jobs/sweep_mtn.py --config jobs/configs/sweep_multi30k.yaml
    ray job submit --working-dir . -- python jobs/sweep_mtn.py --config ...

Every trial runs jobs/train_mtn.py's Ray Train driver (a TorchTrainer, reporting through TuneReportCallback) on
features cached once by jobs/extract_features.py, so no trial runs the frozen encoders. ASHA stops weak trials
on the configured validation metric. MLflow: one parent run for the sweep, one nested run per trial; the parent
gets the results table (CSV + Markdown) and a metric-vs-lr plot per module count. The best trial's translator is
registered only if it beats the linear baseline on val by `gate_margin_pct`. Failed trials are reported, not
fatal. Re-running the same command after the driver died resumes the sweep (Tuner.restore).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mtn.cli import job_parser
from mtn.config import REPO_ROOT, load_config
from mtn.errors import MTNError
from mtn.sweep import SweepConfig, best_row, needs_own_features, plot_metric_vs_lr, results_table, search_space
from mtn.train.cluster import local_cpus, ray_session

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "sweep_local.yaml"


def train_job():
    """The training driver (the one job a sweep imports)."""
    from jobs import train_mtn

    return train_mtn


# ----------------------------------------------------------------------------------------------- setup
def setup_bases(cfg: SweepConfig) -> dict[str, dict]:
    """{variant: its base training config}, with feature caches (extracted once per encoder setting, here) and
    absolute paths; one variant "" when the sweep has none."""
    job = train_job()
    config = REPO_ROOT / cfg.base_config if not Path(cfg.base_config).is_absolute() else Path(cfg.base_config)
    bases = {}
    for variant, extra in cfg.variant_map().items():
        overrides = [*cfg.base_overrides, *extra]
        base = job.prepare_config(config, overrides)
        if not base.feature_cache or needs_own_features(extra):
            feats = Path(cfg.output_dir) / "features" / (variant or ".")
            caches = [f"feature_cache={feats.resolve()}/train", f"val_feature_cache={feats.resolve()}/val"]
            if not (feats / "train" / "manifest.json").is_file():
                print(f"extracting features once for every trial{' of ' + variant if variant else ''} -> {feats}")
                p = subprocess.run([sys.executable, str(REPO_ROOT / "jobs" / "extract_features.py"), "--config",
                                    str(config), *overrides, *caches], cwd=REPO_ROOT)
                if p.returncode != 0:
                    raise MTNError(f"feature extraction failed (exit {p.returncode})")
            base = job.prepare_config(config, [*overrides, *caches])
        base.val_every = base.checkpoint_every = min(base.val_every, base.checkpoint_every)  # ASHA sees every val
        base.output_dir = cfg.output_dir  # trials write into the sweep's folder, never into the base job's
        base.mlflow_tracking_uri = cfg.mlflow_tracking_uri
        base.mlflow_experiment = cfg.mlflow_experiment
        bases[variant] = base.to_dict()
    return bases


def trial(config: dict, bases: dict[str, dict], parent_run_id: str) -> None:
    """One Tune trial: the training driver with this trial's hyperparameters, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mtn.train.fit import fit
    from mtn.train_config import TrainConfig

    job = train_job()
    params = {k: v for k, v in config.items() if k != "variant"}
    base = bases[config.get("variant", "")]
    trial_id = tune.get_context().get_trial_id()
    cfg = TrainConfig(**{**base, **params, "name": f"{base['name']}-{trial_id}",
                         "output_dir": f"{base['output_dir']}/trials/{trial_id}",
                         "storage_path": f"{base['output_dir']}/trials/{trial_id}/ray_results",
                         "mlflow_parent_run_id": parent_run_id})
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    result = fit(job.train_loop_per_worker, cfg, callbacks=[TuneReportCallback()])
    job.publish_and_upload(cfg, result)  # the trial's MLflow run gets its translator


def run_tuner(cfg: SweepConfig, bases: dict[str, dict], parent_run_id: str):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    storage = str(Path(cfg.storage_path).resolve())
    # the base configs ride along as constants (with_parameters), not in the param space: Tune's tables and the
    # trial configs show the hyperparameters only. The trial's own process only waits on its TorchTrainer.
    trainable = tune.with_resources(tune.with_parameters(trial, bases=bases, parent_run_id=parent_run_id),
                                    {"CPU": 0.01})
    if tune.Tuner.can_restore(f"{storage}/{cfg.name}"):
        print(f"resuming the sweep from {storage}/{cfg.name}")
        return tune.Tuner.restore(f"{storage}/{cfg.name}", trainable=trainable, resume_errored=False).fit()
    base = next(iter(bases.values()))
    per_trial = base["num_workers"] * base["cpus_per_worker"]
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = cfg.max_concurrent or max(1, int((cpus - 1) // per_trial) if cpus > per_trial else 1)
    # max_t one past the last report: at max_t ASHA stops the trial itself, before the trial function returns and
    # publishes its translator; the last report should end the trial by training ending, not by a STOP
    scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=cfg.grace_period,
                              reduction_factor=cfg.reduction_factor,
                              max_t=max(1, base["max_steps"] // base["checkpoint_every"]) + 1) if cfg.early_stop \
        else FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                    num_samples=cfg.num_samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()


def rows_of(grid, bases: dict[str, dict]) -> list[dict]:
    rows = []
    for r in grid:
        m, c = r.metrics or {}, r.config or {}
        trial_id = m.get("trial_id") or (Path(r.path).name if r.path else "")
        rows.append({"trial": trial_id, "status": "error" if r.error else "ok", "variant": c.get("variant", ""),
                     "lr": c.get("lr"), "num_modules": c.get("num_modules"), "hidden_dim": c.get("hidden_dim"),
                     "loss_rec": c.get("loss_rec"), "loss_adv": c.get("loss_adv"), "steps": m.get("step"),
                     **{k: m.get(k) for k in ("val/r@1", "val/token_mse", "val/pooled_cosine",
                                              "val/linear_token_mse", "val/margin_token_mse_pct")},
                     "error": str(r.error).splitlines()[0] if r.error else ""})
        out = f"{bases[c.get('variant', '')]['output_dir']}/trials/{trial_id}" if c else ""
        rows[-1]["translator"] = final_translator(out) if out else ""
    return rows


def final_translator(trial_dir: str) -> str:
    """The translator a trial trained to the end, or "". The trial publishes it to trial_dir/translator; when ASHA
    stops a trial at a rung that is also its last report, it dies before publishing, but its final checkpoint
    (the only one holding a translator) is there."""
    if Path(trial_dir, "translator", "translator.json").is_file():
        return f"{trial_dir}/translator"
    found = sorted(Path(trial_dir, "ray_results").glob("*/checkpoint_*/translator/translator.json"))
    return str(found[-1].parent) if found else ""


# ----------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    args = job_parser(__doc__, DEFAULT_CONFIG, "sweep YAML", "num_samples=8").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=SweepConfig).resolve_paths()
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        bases = setup_bases(cfg)
        return sweep(cfg, bases)
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def sweep(cfg: SweepConfig, bases: dict[str, dict]) -> int:
    import mlflow

    from mtn.mlflow_models import CHAMPION, log_translator, register
    from mtn.train.tracking import MLflowTracker
    from mtn.translator import read_target_space, target_space_tags

    tracker = MLflowTracker(cfg, _parent_id(cfg), job="sweep_mtn")
    (Path(cfg.output_dir) / "parent_run_id").write_text(tracker.run_id)
    with ray_session(**ray_options(cfg, bases)):
        grid = run_tuner(cfg, bases, tracker.run_id)
    rows = rows_of(grid, bases)
    csv_text, md = results_table(rows)
    out = Path(cfg.output_dir)
    (out / "results.csv").write_text(csv_text)
    (out / "results.md").write_text(md)
    plot_metric_vs_lr([r for r in rows if r["status"] == "ok"], cfg.metric, out / "metric_vs_lr.png")
    for f in ("results.csv", "results.md", "metric_vs_lr.png"):
        mlflow.log_artifact(str(out / f))
    failed = [r for r in rows if r["status"] == "error"]
    print("\n" + md)
    if failed:
        print(f"{len(failed)} trial(s) failed (the sweep went on): " + "; ".join(f"{r['trial']}: {r['error']}"
                                                                           for r in failed))
    best = best_row([r for r in rows if r["translator"]], cfg.metric, cfg.mode)
    if best is None:
        print("no trial trained to the end: nothing to register", file=sys.stderr)
        mlflow.end_run()
        return 1
    margin = best.get("val/margin_token_mse_pct")
    mlflow.log_metrics({"best/" + k.replace("@", "_at_").removeprefix("val/"): v for k, v in best.items()
                        if k.startswith("val/") and isinstance(v, float)})
    versus = f"{margin:+.2f}%" if margin is not None else "not measured (compare_linear=false)"
    print(f"best trial {best['trial']}: lr={best['lr']:.3g} num_modules={best['num_modules']} "
          f"{cfg.metric}={best[cfg.metric]:.4f}, token MSE margin over the linear map {versus}")
    if cfg.register_model and margin is not None and margin >= cfg.gate_margin_pct:
        # a pyfunc model of the sweep's run (its "Logged models"), registered and promoted: models:/<name>@champion
        info = log_translator(tracker.run_id, best["translator"], "best_translator", cfg.mlflow_tracking_uri)
        uri = register(mlflow.MlflowClient(cfg.mlflow_tracking_uri), cfg.register_model, info, alias=CHAMPION,
                       tags=target_space_tags(read_target_space(best["translator"])))  # mtn.target_*
        mlflow.set_tags({"mtn.registered_model": uri, "mtn.champion": f"models:/{cfg.register_model}@{CHAMPION}"})
        print(f"registered the best translator as {uri}, alias {CHAMPION} (it beats the linear map by {margin:.2f}% >= "
              f"{cfg.gate_margin_pct}%)")
    elif cfg.register_model:
        print(f"not registered: the best trial's margin over the linear baseline ({margin}) is below the gate "
              f"({cfg.gate_margin_pct}%); see {out / 'results.md'}")
    mlflow.end_run()
    return 0


def ray_options(cfg: SweepConfig, bases: dict[str, dict]) -> dict:
    """init_ray's arguments for the sweep (mtn/train/cluster.py): the trials' workers get DS_ACCELERATOR=cpu only
    when no trial uses a GPU. Locally, one logical CPU of slack for the trial drivers (0.01 CPU each: they only wait
    on their trainers)."""
    return {"address": cfg.ray_address, "num_cpus": local_cpus() + 1,
            "use_gpu": any(base["use_gpu"] for base in bases.values())}


def _parent_id(cfg: SweepConfig) -> str | None:
    f = Path(cfg.output_dir) / "parent_run_id"
    return f.read_text().strip() if f.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
