"""One config system for the jobs and the service: YAML + `key=value` overrides -> a validated pydantic model.

    load_config("jobs/configs/local.yaml", ["max_steps=20", "num_modules=[3, 5]"])   # -> TrainConfig

String values may use `${ENV:-default}` (environment) and `{field}` (another config field, e.g.
`{data_root}/multi30k/train.{source_lang}.gz`); both are resolved when a config is built, so
`TrainConfig(**cfg.to_dict())` inside a Ray worker gives the same config back. Lists are YAML lists
(`languages: [de, fr]`); a bare scalar is a list of one. Unknown keys are refused with a did-you-mean hint,
and every validation error is ONE line (an MTNError naming the key), never a pydantic traceback.

Classes: `Config` (the loader's base), `RunConfig` (a job with an output folder and MLflow: path resolution and
the MLflow default, once), `JobConfig` (what both Ray Train jobs share), `TrainConfig` (jobs/train_mtn.py,
jobs/extract_features.py). FinetuneConfig, EvalConfig, SweepConfig and the service's AppArgs use the same loader.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Annotated, ClassVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from mtn.errors import MTNError

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout, or site-packages when installed (`pip install .`)
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file()
# Multi30k & co.: ../shared/data beside a checkout; installed, ./shared/data under the working directory
SHARED_DATA = str(REPO_ROOT.parent / "shared" / "data") if IN_CHECKOUT else "shared/data"

PRECISIONS = ("auto", "fp32", "amp-bf16", "bf16", "fp16")  # mtn/train/precision.py; auto: bf16 where it is fast
_REF = re.compile(r"\{(\w+)\}")
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def one_or_list(sep: str):
    """A list field's parser: a YAML list as is, "" -> [], a bare scalar -> [it]; a string holding `sep` is the
    old joined format ("3,5"), refused with the way to write it rather than read as one item."""

    def parse(value):
        if value is None or isinstance(value, (list, tuple)):
            return value
        if isinstance(value, str) and not value.strip():
            return []
        if isinstance(value, str) and sep in value:
            raise ValueError(f"must be a YAML list like [a, b], not {value!r}")
        return [value]

    return parse


Strs = Annotated[list[str], BeforeValidator(one_or_list(","))]  # e.g. languages: [de, fr]
Ints = Annotated[list[int], BeforeValidator(one_or_list(","))]
Floats = Annotated[list[float], BeforeValidator(one_or_list(","))]
Prompts = Annotated[list[str], BeforeValidator(one_or_list("|"))]  # prompts may hold commas
Overrides = Annotated[list[str], BeforeValidator(one_or_list(" "))]  # [key=value, ...]


class Config(BaseModel):
    """Base of every job config: extra keys refused, templates resolved on construction, checks as one line."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    def __init__(self, /, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise MTNError(one_line(e, type(self))) from None

    @model_validator(mode="before")
    @classmethod
    def _templates(cls, data):
        if not isinstance(data, dict):
            return data
        defaults = {k: f.get_default(call_default_factory=True) for k, f in cls.model_fields.items()
                    if not f.is_required()}
        return resolve({**defaults, **data})

    @model_validator(mode="after")
    def _checks(self):
        for ok, msg in self.checks():
            if not ok:
                raise MTNError(f"config: {msg}")
        return self

    def checks(self) -> list[tuple[bool, str]]:
        """(condition, message if it is false) pairs; subclasses extend super().checks()."""
        return []

    def to_dict(self) -> dict:
        return self.model_dump()


class RunConfig(Config):
    """A job with an output folder and an MLflow experiment."""

    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir",)  # local paths the driver makes absolute

    name: str = "mtn"
    output_dir: str = "outputs"
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///{output_dir}/mlflow.db
    mlflow_experiment: str = "mtn"

    def resolve_paths(self):
        """In the driver, before any worker starts: local paths of PATH_KEYS absolute (workers run elsewhere;
        URIs stay as they are), and the MLflow default ($MLFLOW_TRACKING_URI, else SQLite in output_dir)."""
        for key in self.PATH_KEYS:
            value = getattr(self, key)
            if value and "://" not in value:
                setattr(self, key, str(Path(value).expanduser().resolve()))
        self.mlflow_tracking_uri = (self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                    or f"sqlite:///{self.output_dir}/mlflow.db")
        return self


class JobConfig(RunConfig):
    """What both Ray Train jobs share (jobs/train_mtn.py, jobs/finetune_unet.py). batch_size is GLOBAL."""

    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir", "storage_path")
    ALLOWED_PRECISIONS: ClassVar[tuple[str, ...]] = PRECISIONS

    seed: int = 0
    # --- optimisation
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after linear warmup)
    lr_min_ratio: float = 0.01  # cosine ends at lr * lr_min_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 32
    max_steps: int = 200
    # --- logging / validation / checkpoints
    log_every: int = 10  # train metrics to MLflow every N steps (val steps always)
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
    precision: str = "fp32"  # mtn/train/precision.py
    max_failures: int = 0
    storage_path: str = "{output_dir}/ray_results"  # local path or s3://
    ray_address: str | None = None  # None: $RAY_ADDRESS or a local cluster
    stop_timeout_s: float = 300.0  # after SIGTERM: time to checkpoint at a step boundary before exiting
    #                               without one (mtn/train/preemption.py); a second SIGTERM exits at once

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}"),
            (self.precision in self.ALLOWED_PRECISIONS,
             f"precision must be {'|'.join(self.ALLOWED_PRECISIONS)}, got {self.precision!r}"),
            (self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant|cosine, got {self.lr_schedule!r}"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (min(self.val_every, self.checkpoint_every, self.log_every) >= 1,
             "val_every, checkpoint_every and log_every must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio must be in [0, 1]"),
            (self.resume in ("auto", "never", "force"), f"resume must be auto|never|force, got {self.resume!r}"),
        ]


class TrainConfig(JobConfig):
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir", "storage_path", "feature_cache", "val_feature_cache")

    name: str = "mtn-local"
    output_dir: str = "outputs/local"  # final translator goes to {output_dir}/translator
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
    languages: Strs = []  # what source_lang=all stands for: *_file paths become one file per language
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
    data_root: str = "${MTN_SHARED_DATA:-" + SHARED_DATA + "}"
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
    # --- tracking
    mlflow_parent_run_id: str | None = None  # set by jobs/sweep_mtn.py: this run is nested under the sweep's run

    def checks(self) -> list[tuple[bool, str]]:
        losses = (self.loss_mse, self.loss_adv, self.loss_rec, self.loss_cycle)
        return super().checks() + [
            (self.batch_size >= self.num_workers, f"batch_size ({self.batch_size}) is global and must be >= "
                                                   f"num_workers ({self.num_workers})"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.block_layout in ("gluegen", "mixer"), f"block_layout must be gluegen|mixer, got {self.block_layout!r}"),
            (self.language_mix in ("interleave", "rotate"),
             f"language_mix must be interleave|rotate, got {self.language_mix!r}"),
            (self.method in ("mtn", "linear", "pooled_linear"),
             f"method must be mtn|linear|pooled_linear, got {self.method!r}"),
            (self.feature_dtype in ("float16", "bfloat16"), f"feature_dtype must be float16|bfloat16, "
                                                             f"got {self.feature_dtype!r}"),
            (min(self.extract_workers, self.extract_batch_size, self.extract_shard_rows) >= 1,
             "extract_workers, extract_batch_size and extract_shard_rows must be >= 1"),
            (self.ridge_alpha >= 0, "ridge_alpha must be >= 0"),
            (min(losses) >= 0, "loss weights must be >= 0"),
            (max(losses) > 0, "all loss weights are 0"),
            (bool(self.corpus) != bool(self.source_file or self.target_file),
             "give either `corpus` (monolingual) or `source_file` + `target_file` (parallel), not both/neither"),
            (bool(self.source_file) == bool(self.target_file), "parallel data needs both source_file and target_file"),
        ]

    @property
    def loss_weights(self) -> dict:
        return {"mse": self.loss_mse, "adv": self.loss_adv, "rec": self.loss_rec, "cycle": self.loss_cycle}


# ----------------------------------------------------------------------------------------------- templates
def resolve(raw: dict) -> dict:
    """Expand ${ENV:-default}, then {field} references (a few rounds for chains), then ~ in strings.
    With source_lang=all, a *_file path with {source_lang} becomes a comma list of one path per language."""
    out = {k: expand_env(v) for k, v in raw.items()}
    if out.get("source_lang") == "all":
        try:
            langs = [str(x) for x in one_or_list(",")(out.get("languages")) or []]
        except ValueError as e:
            raise MTNError(f"config: languages {e}") from None
        if not langs:
            raise MTNError("config: source_lang=all needs `languages` (e.g. languages: [de, fr, cs])")
        for k, v in out.items():
            if k.endswith("_file") and isinstance(v, str) and "{source_lang}" in v:
                out[k] = ",".join(v.replace("{source_lang}", lang) for lang in langs)
    for _ in range(4):  # {field} -> its value; other braces (e.g. shard ranges {00000..00099}) stay as they are
        sub = functools.partial(_REF.sub, functools.partial(_field, {k: ("" if v is None else v) for k, v in out.items()
                                                                    if not isinstance(v, (dict, list))}))
        out = {k: _map_str(v, sub) for k, v in out.items()}
    return {k: _map_str(v, lambda s: os.path.expanduser(s) if s.startswith("~") else s) for k, v in out.items()}


def _map_str(value, fn):
    """fn applied to a string, or to each string of a list (one level: paths, prompts)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [fn(v) if isinstance(v, str) else v for v in value]
    return value


def expand_env(value):
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def _field(values: dict, m: re.Match) -> str:
    return str(values[m.group(1)]) if m.group(1) in values else m.group(0)


# ----------------------------------------------------------------------------------------------- errors
_KINDS = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "a list", "dict": "a mapping"}


def one_line(e: ValidationError, cls: type[BaseModel]) -> str:
    """A pydantic ValidationError -> one line naming each key: unknown keys (with a did-you-mean hint) first."""
    unknown, other = [], []
    for err in e.errors():
        loc = err["loc"]
        key = "".join(f"[{p}]" if isinstance(p, int) else f"{'.' if i else ''}{p}" for i, p in enumerate(loc))
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(loc[-1]), _fields_at(cls, loc[:-1]), 1)
            unknown.append(f"{key!r}" + (f" (did you mean {'.'.join([*map(str, loc[:-1]), near[0]])!r}?)"
                                         if near else ""))
        elif isinstance(err.get("ctx", {}).get("error"), MTNError):  # a check, or a nested config: a sentence
            other.append(str(err["ctx"]["error"]))
        else:
            reason = _reason(err)
            other.append(f"config: {reason}" if not loc or reason.startswith(key) else f"config: {key} {reason}")
    if unknown:
        return f"unknown config key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}"
    return "; ".join(dict.fromkeys(other))


def _reason(err: dict) -> str:
    kind = err["type"].split("_")[0]
    if err["type"] == "missing":
        return "is required"
    if err["type"] == "value_error":
        return str(err["ctx"]["error"])
    if kind in _KINDS and err["type"].endswith(("_type", "_parsing", "_from_float")):
        return f"must be {_KINDS[kind]}, got {err['input']!r}"
    return f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}"


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at loc, for the did-you-mean hint."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return list(cls.model_fields)


# ----------------------------------------------------------------------------------------------- loading
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key, line = str(self.construct_object(key_node, deep=deep)), key_node.start_mark.line + 1
            if key in lines:
                raise MTNError(f"config key {key!r} given twice (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MTNError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        raise MTNError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except MTNError as e:
        raise MTNError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise MTNError(f"config {path} must be a mapping of key: value")
    return raw


def parse_overrides(items: list[str]) -> dict:
    """["lr=1e-3", "num_modules=[3, 5]", "limits.max_width=256"] -> {key: YAML value}; a value that is a template
    like `{data_root}/t.gz` or `{source_lang}` stays the string it is."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MTNError(f"override {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:  # e.g. a path starting with {data_root}: not YAML, just a string
            parsed = value
        if isinstance(parsed, dict) and all(v is None for v in parsed.values()):  # "{field}": a template
            parsed = value
        out[key.strip()] = parsed
    return out


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> dict:
    """raw with overrides on top; a dotted key (limits.max_width=256) sets a nested value."""
    out = dict(raw)
    for key, value in (parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})).items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[leaf] = value
    return out


def validate(cls: type[BaseModel], data: dict):
    """cls(**data) for any pydantic model (the service's too), errors as one MTNError line."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise MTNError(one_line(e, cls)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls=TrainConfig):
    """YAML + overrides -> `cls` (TrainConfig by default; FinetuneConfig, EvalConfig, SweepConfig ...)."""
    raw = read_yaml(path) if path is not None else {}
    return validate(cls, expand_env(apply_overrides(raw, overrides)))
