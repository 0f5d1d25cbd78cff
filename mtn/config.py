"""One config system for the jobs and the service: YAML + `key=value` overrides -> a validated pydantic model.

    load_config("jobs/configs/local.yaml", ["max_steps=20", "num_modules=[3, 5]"])   # -> TrainConfig

String values may use `${ENV:-default}` (environment) and `{field}` (another config field, e.g.
`{data_root}/multi30k/train.{source_lang}.gz`); both are resolved when a config is built, so
`TrainConfig(**cfg.to_dict())` inside a Ray worker gives the same config back. Lists are YAML lists
(`languages: [de, fr]`); a bare scalar is a list of one. Unknown keys are refused with a did-you-mean hint,
and every validation error is ONE line (an MTNError naming the key), never a pydantic traceback.

Classes: `Config` (the loader's base), `RunConfig` (a job with an output folder and MLflow: path resolution and
the MLflow default, once), mtn.train.config.JobConfig (what both Ray Train jobs share). TrainConfig (mtn/train_config.py: jobs/train_mtn.py,
jobs/extract_features.py), FinetuneConfig, EvalConfig, SweepConfig and the service's AppArgs use the same loader.
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


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None, cls=None):
    """YAML + overrides -> `cls` (mtn.train_config.TrainConfig by default; FinetuneConfig, EvalConfig, ...)."""
    if cls is None:
        from mtn.train_config import TrainConfig as cls
    raw = read_yaml(path) if path is not None else {}
    return validate(cls, expand_env(apply_overrides(raw, overrides)))
