"""Train a Model Translation Network on Ray Train + DeepSpeed.

    python jobs/train_mtn.py                                    # jobs/configs/local.yaml: tiny, offline, CPU
    python jobs/train_mtn.py --config jobs/configs/multi30k.yaml source_lang=de max_steps=500
    ray job submit --working-dir . -- python jobs/train_mtn.py --config jobs/configs/xlmr_sd14.yaml

Reads text (monolingual or parallel) and runs the frozen source and target encoders on each batch, or reads a
feature cache from jobs/extract_features.py (`feature_cache`, checked against the config; no encoders loaded).
Trains the MTN (+ token discriminator when loss_adv > 0), or fits a closed-form baseline (method=linear |
pooled_linear, mtn/baselines.py); an MTN run also fits the linear map and reports its margin over it. It validates
every `val_every` steps (token MSE, pooled cosine, R@1/R@5), checkpoints through `ray.train.report` (resumed after worker failures or when re-run with the same
`name` and `storage_path`), logs to MLflow on rank 0, and writes the translator to `{output_dir}/translator`.
With `register_model` set, the translator logged to MLflow becomes a new version of that registered model, tagged
with its target space (mtn.target_encoder / _width / _length), and `register_alias` (champion) moves to it:
`models:/<register_model>@champion` is then what a service or the finetune consumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

from mtn.baselines import fit_baseline, linear_margin
from mtn.cli import job_parser
from mtn.config import load_config
from mtn.data import config_files, config_pairs
from mtn.data.corpus import batch_indices
from mtn.data.features import check_cache, encode_rows, expected_record, load_features, read_feature_manifest
from mtn.encoders import FrozenTextEncoder, load_text_encoder
from mtn.errors import MTNError
from mtn.losses import mtn_losses
from mtn.metrics import alignment_metrics, target_ids
from mtn.model import ModelTranslationNetwork, TokenDiscriminator
from mtn.train.checkpoint import checkpoint_or_stop, final_state, load_checkpoint, report
from mtn.train.deepspeed import initialize_engine
from mtn.train.fit import exit_code, fit_or_preempt, print_summary
from mtn.train.precision import describe, input_dtype, resolve_precision
from mtn.train.preemption import StopSignal
from mtn.train.tracking import RunTracker, save_loss_curve, upload_outputs
from mtn.train_config import TrainConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


class MTNTrainModule(torch.nn.Module):
    """MTN + discriminator in one module, so that one DeepSpeed engine (one optimizer) trains both."""

    def __init__(self, mtn: ModelTranslationNetwork, disc: TokenDiscriminator, weights: dict, mse_on_mask: bool):
        super().__init__()
        self.mtn, self.disc, self.weights, self.mse_on_mask = mtn, disc, weights, mse_on_mask

    def forward(self, source, source_mask, target, target_mask):
        return mtn_losses(self.mtn, self.disc, source, source_mask, target, target_mask, self.weights,
                          self.mse_on_mask)


# ----------------------------------------------------------------------------------------------- setup
def setup_features(cfg: TrainConfig, device):
    """-> (train rows, val rows, encoder specs). With a feature cache nothing is encoded (no encoder loaded);
    otherwise train stays text and each batch is encoded when drawn."""
    if cfg.feature_cache:
        manifest = read_feature_manifest(cfg.feature_cache)  # the driver already checked it against this config
        train = load_features(cfg.feature_cache, manifest)
        val = load_features(cfg.val_feature_cache) if cfg.val_feature_cache and cfg.max_val_samples else None
        if val is not None:  # the cache was checked against these pairs: row i is val pair i
            val["target_id"] = target_ids(config_pairs(cfg)[1])  # R@k over distinct targets (one per language)
        specs = {side: {**manifest[side], "hidden_size": manifest[f"{side.split('_')[0]}_dim"]}
                 for side in ("source_encoder", "target_encoder")}
        return CachedRows(train), val, specs
    source, target = (load_text_encoder(getattr(cfg, f"{side}_encoder"), getattr(cfg, f"{side}_max_length"),
                                        getattr(cfg, f"{side}_prefix"), getattr(cfg, f"{side}_subfolder"),
                                        dtype=cfg.encoder_dtype, device=device,
                                        revision=getattr(cfg, f"{side}_revision")) for side in ("source", "target"))
    train_pairs, val_pairs = config_pairs(cfg)
    val = encode_rows(source, target, val_pairs) if val_pairs else None
    if val is not None:
        val["target_id"] = target_ids(val_pairs)
    train = TextPairs(train_pairs, source, target, full_target=not cfg.mse_on_mask, fit_samples=cfg.baseline_samples)
    return train, val, {"source_encoder": source.spec(), "target_encoder": target.spec()}


def build_mtn(cfg: TrainConfig, source_dim: int, target_dim: int) -> ModelTranslationNetwork:
    dims = dict(source_dim=source_dim, target_dim=target_dim, source_len=cfg.source_max_length,
                target_len=cfg.target_max_length, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout,
                with_decoder=bool(cfg.loss_rec or cfg.loss_cycle), target_stats=cfg.target_stats,
                linear_skip=cfg.linear_skip, block_layout=cfg.block_layout, decoder_modules=cfg.decoder_modules,
                standardize=cfg.standardize)
    if cfg.num_modules is not None:
        return ModelTranslationNetwork(num_modules=cfg.num_modules, **dims)
    return ModelTranslationNetwork.from_named_size(cfg.mtn_size, **dims)


def setup_engine(cfg: TrainConfig, source_dim: int, target_dim: int, micro_batch: int, stats_rows=None,
                 linear_fit=None):
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    mtn = build_mtn(cfg, source_dim, target_dim)
    if cfg.standardize:  # same rows on every rank -> same statistics (a resumed run loads them back anyway)
        mtn.set_feature_stats(stats_rows())
    if cfg.target_stats:
        mtn.set_target_stats(stats_rows()["target"][: cfg.baseline_samples],
                             stats_rows()["target_mask"][: cfg.baseline_samples] if cfg.mse_on_mask else None)
    if cfg.linear_skip:  # deterministic closed form: every rank fits the same map
        mtn.init_linear_skip(linear_fit())
        for p in (mtn.skip_channel, mtn.skip_sequence, mtn.skip_bias):
            p.requires_grad_(False)
    disc = TokenDiscriminator(target_dim, cfg.disc_hidden_dim)
    module = MTNTrainModule(mtn, disc, cfg.loss_weights, cfg.mse_on_mask)
    # the fitted linear map stays fixed (Adam's per-step noise would only pull it off the ridge optimum): the mixer
    # body learns the residual the linear map cannot explain
    params = [p for name, p in module.named_parameters()
              if (cfg.loss_adv or not name.startswith("disc.")) and p.requires_grad]
    return initialize_engine(module, [{"params": params}], cfg, micro_batch)


# ----------------------------------------------------------------------------------------------- data
# The training set, one type per source, both with len(), rows(idx) -> one local batch {source [b, S_s, d_s],
# source_mask [b, S_s], target [b, S_t, d_t], target_mask [b, S_t]}, fit_rows() -> the rows of the closed-form fits,
# and source_encoder (the loaded source LM a translator can bundle, or None).
@dataclasses.dataclass
class CachedRows:
    """A feature cache (jobs/extract_features.py), loaded whole: [N, S, d] tensors."""

    features: dict[str, torch.Tensor]
    source_encoder = None

    def __len__(self) -> int:
        return len(self.features["source"])

    def rows(self, idx: torch.Tensor) -> dict:
        return {k: v[idx] for k, v in self.features.items()}

    def fit_rows(self) -> dict:
        return self.features


@dataclasses.dataclass
class TextPairs:
    """Text pairs, encoded by the frozen encoders batch by batch; the fits use the first `fit_samples` pairs."""

    pairs: list[tuple[str, str]]
    source_encoder: FrozenTextEncoder
    target_encoder: FrozenTextEncoder
    full_target: bool
    fit_samples: int

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def rows(self, idx: torch.Tensor) -> dict:
        # the MTN masks padded source positions, so the source LM stops at the batch's longest caption
        return encode_rows(self.source_encoder, self.target_encoder, [self.pairs[i] for i in idx.tolist()],
                           full_target=self.full_target, batch_size=len(idx))

    @torch.no_grad()
    def fit_rows(self) -> dict:
        return encode_rows(self.source_encoder, self.target_encoder, self.pairs[: self.fit_samples],
                           full_target=self.full_target)


@torch.no_grad()
def validate(engine, val, dtype, batch_size: int = 128) -> dict:
    """Every rank runs the whole (small) val set: under ZeRO-3 the forward is collective."""
    engine.module.eval()
    src, src_m, dev = val["source"], val["source_mask"], engine.device
    preds = [engine.module.mtn.encode(src[i:i + batch_size].to(dev, dtype), src_m[i:i + batch_size].to(dev)).float().cpu()
             for i in range(0, len(src), batch_size)]
    engine.module.train()
    return {f"val/{k}": v for k, v in alignment_metrics(torch.cat(preds), val["target"], val["target_mask"],
                                                       target_ids=val.get("target_id")).items()}


# ----------------------------------------------------------------------------------------------- checkpoints
def save_translator(model, source_encoder, specs: dict, cfg: TrainConfig, state: dict, out_dir: Path):
    from mtn.translator import BUNDLED_ENCODER, save_translator_folder

    bundle = cfg.bundle_source_encoder and source_encoder is not None
    if bundle:
        source_encoder.save(out_dir / BUNDLED_ENCODER)
    training = {"config": cfg.to_dict(), "method": cfg.method, "steps": state["step"],
                "final_metrics": state.get("final_metrics")}
    save_translator_folder(out_dir, model, {**specs, "bundled_source_encoder": bundle}, training)


def export_translator(engine, source_encoder, specs, cfg: TrainConfig, state: dict, out_dir: Path, rank: int):
    """Gather the (possibly ZeRO-3 sharded) MTN weights and, on rank 0, save the translator folder."""
    import deepspeed

    mtn = engine.module.mtn
    with deepspeed.zero.GatheredParameters(list(mtn.parameters()), modifier_rank=None):
        if rank == 0:
            clean = ModelTranslationNetwork.from_config(mtn.config)
            clean.load_state_dict({k: v.detach().float().cpu() for k, v in mtn.state_dict().items()})
            save_translator(clean, source_encoder, specs, cfg, state, out_dir)


def write_final_artifacts(tmp: Path, engine, source_encoder, specs, cfg, state, metrics, rank):
    """Into the final checkpoint: translator/, loss_curve.png, metrics.json (the driver uploads them to MLflow
    after publishing them)."""
    export_translator(engine, source_encoder, specs, cfg, state, tmp / "translator", rank)
    if rank == 0:
        save_loss_curve(state["history"], tmp / "loss_curve.png")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))


# ----------------------------------------------------------------------------------------------- loop
def baseline_per_worker(cfg: TrainConfig, train: CachedRows | TextPairs, val, specs, rank: int):
    """method=linear | pooled_linear: a closed-form fit on rank 0, reported like a finished training run."""
    state, metrics = {"step": 1, "history": [], "mlflow_run_id": None}, {"step": 1}

    def finish(tmp: Path):
        if rank != 0:
            return
        tracker = RunTracker(cfg)
        model, val_metrics = fit_baseline(cfg, cfg.method, train.fit_rows(), val)
        metrics.update(val_metrics)
        tracker.log_metrics(metrics, 1)
        tracker.close()
        state.update(final_metrics=val_metrics, mlflow_run_id=tracker.run_id)
        save_translator(model, train.source_encoder, specs, cfg, state, tmp / "translator")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))

    report(None, state, metrics, rank, finish)


def train_loop_per_worker(config: dict):
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    auto = cfg.precision == "auto"
    cfg.precision = resolve_precision(cfg.precision, device.type)  # auto: bf16 autocast only where bf16 is native
    train, val, specs = setup_features(cfg, device)
    if cfg.method != "mtn":
        return baseline_per_worker(cfg, train, val, specs, rank)
    per_worker = cfg.batch_size // world
    rows = functools.cache(train.fit_rows)  # encoded at most once, if ever needed
    linear_fit = functools.cache(lambda: fit_baseline(cfg, "linear", rows(), None)[0])
    engine = setup_engine(cfg, specs["source_encoder"]["hidden_size"], specs["target_encoder"]["hidden_size"],
                          per_worker, rows, linear_fit)
    dtype = input_dtype(cfg.precision)
    state = load_checkpoint(engine, {"step": 0, "history": [], "mlflow_run_id": None}, config=config)
    if rank == 0:
        print(f"precision: {cfg.precision}{' (auto)' if auto else ''} on {describe(device.type)}")
    if rank == 0 and state["step"]:
        print(f"resuming from the checkpoint at step {state['step']} (same name + storage_path); "
              f"give another name=... for a fresh run")
    tracker = RunTracker(cfg, state["mlflow_run_id"]) if rank == 0 else None  # never raises: MLflow may be down
    stop = StopSignal(cfg.name, engine.device)  # SIGTERM to the driver -> checkpoint and return (mtn/train/preemption.py)

    start = state["step"]
    bar = tqdm(total=cfg.max_steps, desc="train_mtn") if rank == 0 else None
    if bar:
        bar.update(start)  # tqdm_ray has no `initial`
    metrics = {}
    steps = batch_indices(len(train), per_worker, rank, world, cfg.seed, start)
    timed_from = None  # (step, time): throughput is measured after a few warm-up steps
    for step, idx in enumerate(steps, start=start + 1):
        if step > cfg.max_steps:
            break
        if step == start + 1 + min(5, (cfg.max_steps - start) // 2):
            timed_from = (step - 1, time.perf_counter())
        b = train.rows(idx)  # [b, S_s, d_s] ... [b, S_t]
        total, terms = engine(b["source"].to(dtype), b["source_mask"], b["target"].to(dtype), b["target_mask"])
        engine.backward(total)
        engine.step()
        metrics = {"step": step, "train/loss": total.item(), **{f"train/{k}": float(v) for k, v in terms.items()}}
        if val is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
            metrics.update(validate(engine, val, dtype))
        state["step"] = step
        if tracker:
            if step % cfg.log_every == 0 or any(k.startswith("val/") for k in metrics) or step == start + 1:
                state["history"].append(metrics)
                tracker.log_metrics(metrics, step)
                state["mlflow_run_id"] = tracker.run_id
            bar.update(1)
            bar.set_description(f"train_mtn loss {metrics['train/loss']:.4f}")
        if step == cfg.max_steps:
            if bar:
                bar.close()  # before the final report, so the driver hears of it before Ray shuts down
                bar = None
            if rank == 0 and cfg.compare_linear:
                metrics.update(linear_margin(linear_fit, val, metrics))
                tracker.log_metrics({k: v for k, v in metrics.items() if "linear" in k or "margin" in k}, step)
            if timed_from:
                sps = (step - timed_from[0]) / (time.perf_counter() - timed_from[1])
                metrics.update({"perf/steps_per_s": sps, "perf/samples_per_s": sps * cfg.batch_size,
                                "perf/bf16_autocast": float(cfg.precision == "amp-bf16")})
            state["final_metrics"] = {k: v for k, v in metrics.items() if k.startswith("val/")}

            report(engine, state, metrics, rank, functools.partial(
                write_final_artifacts, engine=engine, source_encoder=train.source_encoder, specs=specs, cfg=cfg,
                state=state, metrics=metrics, rank=rank))
        elif checkpoint_or_stop(engine, state, metrics, rank, stop, cfg.checkpoint_every):
            break
    if bar:
        bar.close()
    if tracker:  # the run stays RUNNING for the driver's upload, unless preempted
        tracker.close("KILLED" if stop.stopping else None)


# ----------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    args = job_parser(__doc__, DEFAULT_CONFIG).parse_args(argv)
    return exit_code(lambda: drive(args.config, args.overrides))


def drive(config, overrides) -> int:
    cfg = prepare_config(config, overrides)
    train, val = config_pairs(cfg)  # fail fast on bad data, before Ray starts
    if cfg.feature_cache:
        check_feature_caches(cfg, train, val)
    return 0 if run(cfg) else 1


def check_feature_caches(cfg: TrainConfig, train: list, val: list) -> None:
    """Refuse a cache extracted with other encoders, lengths, prefixes or another corpus (never use it silently)."""
    check_cache(cfg.feature_cache, expected_record(cfg, train, config_files(cfg, "train")),
                needs_target_padding=not cfg.mse_on_mask)
    if val and not cfg.val_feature_cache:
        raise MTNError("config: feature_cache is set but val_feature_cache is not; extract both with "
                       "jobs/extract_features.py (or set max_val_samples=0 to skip validation)")
    if val:
        check_cache(cfg.val_feature_cache, expected_record(cfg, val, config_files(cfg, "val")))
    if cfg.bundle_source_encoder:
        print("note: training from a feature cache loads no source encoder, so the translator will reference "
              f"{cfg.source_encoder} instead of bundling it")


def prepare_config(path, overrides) -> TrainConfig:
    cfg = load_config(path, overrides).resolve_paths()  # workers run elsewhere: no relative paths
    data = [f for f in (cfg.corpus, cfg.source_file, cfg.target_file, cfg.val_source_file) if f]
    if any(f.startswith(cfg.data_root) for f in data) and "://" not in cfg.data_root \
            and not Path(cfg.data_root).is_dir():
        from mtn.data.fetch import fetch_command

        cmd = next(filter(None, map(fetch_command, data)), None)  # Multi30k & co.: the command that downloads them
        raise MTNError(f"data folder not found: {cfg.data_root} (set $MTN_SHARED_DATA or data_root=..."
                       + (f", or run: {cmd})" if cmd else ")"))
    for name in ("source_encoder", "target_encoder"):  # check encoders exist before starting workers
        ref = getattr(cfg, name)
        if ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists():
            hint = (" (run: python ../shared/tools/real-encoders/materialize.py, or set $MTN_REAL_ENCODERS)"
                    if "real-encoders" in ref or "mtn-real-encoders" in ref else "")
            raise MTNError(f"{name} not found: {ref}{hint}")
    return cfg


def run(cfg: TrainConfig):
    if "://" not in cfg.output_dir:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return publish_and_upload(cfg, fit_or_preempt(train_loop_per_worker, cfg))


def publish_and_upload(cfg: TrainConfig, result) -> dict | None:
    """The end of a run, in this order: the final checkpoint (saved by fit), the publish, then the MLflow upload,
    which never fails the job (a failure prints the command that retries it)."""
    summary = publish(cfg, result)
    if summary:
        # a sweep's trial (nested under the sweep's run) never registers: the sweep registers its gated best
        register = cfg.register_model if not cfg.mlflow_parent_run_id else None
        upload_outputs(cfg.mlflow_tracking_uri, summary["mlflow_run_id"],
                       {"loss_curve.png": summary["loss_curve"], "metrics.json": summary["metrics"]},
                       {"translator": summary["translator"]}, register, experiment=cfg.mlflow_experiment,
                       run_name=cfg.name, alias=cfg.register_alias)
    return summary


def publish(cfg: TrainConfig, result) -> dict | None:
    """Publish the translator, loss curve and metrics of the final checkpoint to output_dir (a new version, switched
    to at the end: mtn/publish.py); say where to read them."""
    state = final_state(result, cfg.output_dir, "translator", ("translator", "loss_curve.png", "metrics.json"))
    if state is None:
        return None
    at = {name: state["published"].get(name, f"{cfg.output_dir}/{name}") for name in
          ("translator", "loss_curve.png", "metrics.json")}
    metrics = json.loads(Path(at["metrics.json"]).read_text()) if "://" not in cfg.output_dir else {}
    summary = {"translator": at["translator"], "loss_curve": at["loss_curve.png"],
               "metrics": at["metrics.json"], "checkpoint": result.checkpoint.path,
               "mlflow_tracking_uri": cfg.mlflow_tracking_uri, "mlflow_experiment": cfg.mlflow_experiment,
               "mlflow_run_id": state.get("mlflow_run_id"), "steps": state["step"]}
    print_summary("train_mtn", summary, {k: v for k, v in metrics.items() if k.startswith("val/")},
                  (f"  browse runs with:    mlflow ui --backend-store-uri {cfg.mlflow_tracking_uri}",))
    return summary


if __name__ == "__main__":
    sys.exit(main())
