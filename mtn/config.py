"""YAML config + `key=value` overrides -> a validated, flat TrainConfig.

String values may use `${ENV:-default}` (environment) and `{field}` (another config field, e.g.
`{data_root}/multi30k/train.{source_lang}.gz`). Unknown keys and wrong types are refused with a message.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from mtn.errors import MTNError
from mtn.train.precision import PRECISIONS

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    # --- run
    name: str = "mtn-local"
    output_dir: str = "outputs/local"  # final translator goes to {output_dir}/translator
    seed: int = 0
    # --- encoders: hub id, local path, or tiny:<t5|clip|bert|xlmr>
    source_encoder: str = "tiny:t5"
    source_subfolder: str | None = None
    source_max_length: int = 32
    source_prefix: str = ""
    target_encoder: str = "tiny:clip"
    target_subfolder: str | None = None
    target_max_length: int = 77
    target_prefix: str = ""
    encoder_dtype: str = "float32"
    bundle_source_encoder: bool = False  # copy the source LM into the translator folder
    # --- data: `corpus` (monolingual, same sentence to both encoders) or source_file + target_file (parallel)
    corpus: str | None = None  # a path, s3:// URI, or generated:<N> (N template captions)
    source_file: str | None = None
    target_file: str | None = None
    val_source_file: str | None = None  # explicit held-out split; else val_fraction of the training data
    val_target_file: str | None = None
    val_fraction: float = 0.05
    max_val_samples: int = 1000
    max_train_samples: int | None = None
    source_lang: str = ""  # used by path templates ({source_lang}); "all" = every language in `languages`
    languages: str = ""  # comma list that source_lang=all stands for: *_file paths become one file per language
    language_mix: str = "interleave"  # source_lang=all training pairs: interleave (each caption in every language)
    #                                   | rotate (caption i in language i mod k: each caption once); val: always all
    # --- feature cache (jobs/extract_features.py writes it; train_mtn reads it and then never loads the encoders)
    feature_cache: str | None = None  # features of the training pairs: local folder or s3://
    val_feature_cache: str | None = None  # features of the val pairs (val_*_file, or the val split)
    feature_dtype: str = "float16"  # float16 | bfloat16
    extract_workers: int = 2  # Ray Data encoder actors
    extract_batch_size: int = 64
    extract_shard_rows: int = 2048
    extract_gpus_per_worker: float = 0.0
    cache_target_padding: bool = True  # keep target features at padded positions (mse_on_mask=false needs them;
    #                                    false zero-pads them: ~2x faster extraction on short captions, smaller files)
    data_root: str = "${MTN_SHARED_DATA:-" + str(REPO_ROOT.parent / "shared" / "data") + "}"
    # --- model: the MTN, or a baseline fitted in closed form (mtn/baselines.py) for comparison
    method: str = "mtn"  # mtn | linear | pooled_linear
    ridge_alpha: float = 1e-3  # L2 of the linear baselines, relative to the mean feature energy (diag of X^T X)
    compare_linear: bool = True  # also fit the linear map on the training data and report the MTN's margin
    baseline_samples: int = 4096  # without a feature cache, fit it on this many encoded training pairs
    mtn_size: str = "mtn-3rm"
    num_modules: int | None = None  # overrides the named size
    hidden_dim: int | None = None
    dropout: float = 0.0
    block_layout: str = "gluegen"  # gluegen (the paper's residual modules) | mixer (pre-LN mixer blocks; mtn/model.py)
    decoder_modules: int | None = None  # N's modules/blocks (default: as M)
    standardize: bool = False  # per-channel source/target standardisation; losses in standardised units
    target_stats: bool = False  # M outputs shift + scale * body with per-position target statistics
    linear_skip: bool = False  # M = ridge-fitted linear map + gated mixer body (starts at the linear baseline)
    disc_hidden_dim: int = 256
    # --- losses (0 switches a term off; see mtn/losses.py for the defaults' reasons)
    loss_mse: float = 1.0
    loss_adv: float = 0.0
    loss_rec: float = 0.1
    loss_cycle: float = 0.1
    mse_on_mask: bool = False
    # --- optimisation (batch_size is global: divided by num_workers)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after linear warmup)
    lr_min_ratio: float = 0.01  # cosine ends at lr * lr_min_ratio
    grad_clip: float = 1.0
    batch_size: int = 32
    max_steps: int = 200
    # --- logging / validation / checkpoints
    log_every: int = 10  # train metrics to MLflow and the loss curve every N steps (val steps always)
    val_every: int = 50
    checkpoint_every: int = 50
    num_checkpoints_to_keep: int = 2
    # a re-run with the same name + storage_path: auto (resume if the config matches the checkpoint's, else refuse
    # naming the changed keys) | never (delete the run's checkpoints, start at step 0) | force (resume anyway);
    # the keys that may change without refusing: mtn/train/resume.py RESUMABLE
    resume: str = "auto"
    checkpoint_staging_dir: str | None = None  # where ranks write a checkpoint before Ray stores it (free space is
    #                                            checked first): an absolute path on the worker nodes;
    #                                            None: the system temp dir ($TMPDIR or /tmp)
    # --- distributed (Ray Train + DeepSpeed)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    zero_stage: int = 0  # 0-3
    offload_optimizer: bool = False
    precision: str = "fp32"  # auto | fp32 | amp-bf16 | bf16 | fp16 (mtn/train/precision.py; auto: bf16 autocast where native)
    max_failures: int = 0
    storage_path: str = "{output_dir}/ray_results"  # local path or s3://
    ray_address: str | None = None  # None: $RAY_ADDRESS or a local cluster
    stop_timeout_s: float = 300.0  # after SIGTERM: time to checkpoint at a step boundary before exiting
    #                               without one (mtn/train/preemption.py); a second SIGTERM exits at once
    # --- tracking
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///{output_dir}/mlflow.db
    mlflow_experiment: str = "mtn"
    mlflow_parent_run_id: str | None = None  # set by jobs/sweep_mtn.py: this run is nested under the sweep's run

    def __post_init__(self):
        checks = [
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}"),
            (self.precision in PRECISIONS, f"precision must be {'|'.join(PRECISIONS)}, got {self.precision!r}"),
            (self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant|cosine, got {self.lr_schedule!r}"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.batch_size >= self.num_workers, f"batch_size ({self.batch_size}) is global and must be >= "
                                                   f"num_workers ({self.num_workers})"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (min(self.val_every, self.checkpoint_every, self.log_every) >= 1,
             "val_every, checkpoint_every and log_every must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio must be in [0, 1]"),
            (self.block_layout in ("gluegen", "mixer"), f"block_layout must be gluegen|mixer, got {self.block_layout!r}"),
            (self.resume in ("auto", "never", "force"), f"resume must be auto|never|force, got {self.resume!r}"),
            (self.language_mix in ("interleave", "rotate"),
             f"language_mix must be interleave|rotate, got {self.language_mix!r}"),
            (self.method in ("mtn", "linear", "pooled_linear"),
             f"method must be mtn|linear|pooled_linear, got {self.method!r}"),
            (self.feature_dtype in ("float16", "bfloat16"), f"feature_dtype must be float16|bfloat16, "
                                                             f"got {self.feature_dtype!r}"),
            (min(self.extract_workers, self.extract_batch_size, self.extract_shard_rows) >= 1,
             "extract_workers, extract_batch_size and extract_shard_rows must be >= 1"),
            (self.ridge_alpha >= 0, "ridge_alpha must be >= 0"),
            (min(self.loss_mse, self.loss_adv, self.loss_rec, self.loss_cycle) >= 0, "loss weights must be >= 0"),
            (max(self.loss_mse, self.loss_adv, self.loss_rec, self.loss_cycle) > 0, "all loss weights are 0"),
            (bool(self.corpus) != bool(self.source_file or self.target_file),
             "give either `corpus` (monolingual) or `source_file` + `target_file` (parallel), not both/neither"),
            (bool(self.source_file) == bool(self.target_file), "parallel data needs both source_file and target_file"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MTNError(f"config: {msg}")

    @property
    def loss_weights(self) -> dict:
        return {"mse": self.loss_mse, "adv": self.loss_adv, "rec": self.loss_rec, "cycle": self.loss_cycle}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_REF = re.compile(r"\{(\w+)\}")
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _coerce(name: str, value, annotation):
    types_ = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in types_:
            return None
        raise MTNError(f"config: {name} may not be null")
    for t in types_:
        if t is bool and isinstance(value, bool):
            return value
        if t is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if t in (int, float) and not isinstance(value, bool):
            try:
                v = t(value)
            except (TypeError, ValueError):
                continue
            if t is int and isinstance(value, float) and v != value:
                continue
            return v
        if t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(t, "__name__", str(t)) for t in types_)
    raise MTNError(f"config: {name} must be {names}, got {value!r}")


def _resolve(raw: dict) -> dict:
    """Expand ${ENV:-default}, then {field} references (a few rounds for chains), then ~ in strings.
    With source_lang=all, a *_file path with {source_lang} becomes a comma list of one path per language."""
    out = {k: _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), v) if isinstance(v, str) else v
           for k, v in raw.items()}
    if out.get("source_lang") == "all":
        langs = [x.strip() for x in str(out.get("languages") or "").split(",") if x.strip()]
        if not langs:
            raise MTNError("config: source_lang=all needs `languages` (e.g. languages: de,fr,cs)")
        for k, v in out.items():
            if k.endswith("_file") and isinstance(v, str) and "{source_lang}" in v:
                out[k] = ",".join(v.replace("{source_lang}", lang) for lang in langs)
    for _ in range(4):  # {field} -> its value; other braces (e.g. shard ranges {00000..00099}) stay as they are
        fmt = {k: ("" if v is None else v) for k, v in out.items()}
        out = {k: _REF.sub(functools.partial(_field, fmt), v) if isinstance(v, str) else v for k, v in out.items()}
    return {k: os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") else v for k, v in out.items()}


def _field(values: dict, m: re.Match) -> str:
    return str(values[m.group(1)]) if m.group(1) in values else m.group(0)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MTNError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:  # e.g. a path starting with {data_root}: not YAML, just a string
            parsed = value
        out[key.strip()] = parsed if not isinstance(parsed, (dict, list)) or not value.startswith("{") else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls=TrainConfig):
    """YAML + overrides -> `cls` (TrainConfig by default; any flat dataclass, e.g. FinetuneConfig)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MTNError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise MTNError(f"config {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise MTNError(f"config {path} must be a mapping of key: value")
    raw.update(parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {}))
    unknown = [k for k in raw if k not in fields]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, fields, 1)) else "")
                 for k in unknown]
        raise MTNError(f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(hints)}")
    defaults = {k: f.default for k, f in fields.items() if f.default is not dataclasses.MISSING}
    merged = _resolve({**defaults, **raw})
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in merged.items()})


def config_field_names() -> list[str]:
    return list(FIELDS)


def comma_list(text, cast=str) -> list:
    """"3,5" -> [3, 5] with cast=int; blanks dropped; a value cast refuses is a config error, not a traceback."""
    try:
        return [cast(x.strip()) for x in str(text or "").split(",") if x.strip()]
    except ValueError:
        kind = {int: "integers", float: "numbers"}.get(cast, "values")
        raise MTNError(f"config: {text!r} is not a comma list of {kind}") from None

