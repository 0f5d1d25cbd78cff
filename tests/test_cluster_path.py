"""The cluster path, offline: every `models:/NAME...` that the chart's default render serves (serveConfigV2
translators) or that a RayJob in k8s/ consumes (the finetune's translator) is registered by a RayJob in k8s/ (a
jobs/train_mtn.py entrypoint whose config, with the entrypoint's key=value overrides, has register_model NAME), under
the alias asked for, in the target space of the pipeline that consumes it (that hub id's text_encoder, 77 tokens).
Also: the extraction and the training of one config share data and caches, and the extraction's init container
downloads exactly that config's hub encoders. No cluster, no network: helm template and the project's config loader.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
import types
from dataclasses import dataclass

import pytest
import yaml

from tests.helm_chart import REPO, by_kind, helm_path, render, serve_app

K8S = REPO / "k8s"
CONFIG_CLASSES = {"jobs/train_mtn.py": ("mtn.train_config", "TrainConfig"),
                  "jobs/extract_features.py": ("mtn.train_config", "TrainConfig"),
                  "jobs/finetune_unet.py": ("mtn.finetune_config", "FinetuneConfig")}
REGISTERS = "jobs/train_mtn.py"  # the job whose config's register_model / register_alias name a translator
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")
TEXT_ENCODER, CONTEXT_TOKENS = "text_encoder", 77  # what a StableDiffusionPipeline's UNet cross-attends to


@dataclass(frozen=True)
class Command:
    job: str  # "k8s/<file>: RayJob/<name>"
    script: str
    cfg: object  # TrainConfig | FinetuneConfig, the entrypoint's overrides applied


@dataclass(frozen=True)
class Consumer:
    where: str
    uri: str
    pipeline: str  # hub id[@revision] whose text encoder's space the translator must produce


# ------------------------------------------------------------------------------------------------ reading
def commands(entrypoint: str) -> list[list[str]]:
    """A RayJob entrypoint (run by a shell) -> the argv of each of its commands (split at &&, || and ;)."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True  # words end at whitespace and at ; & | only (not at = : / @)
    out = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            out.append([])
        else:
            out[-1].append(token)
    return [argv for argv in out if argv]


def head_env(job: dict) -> dict[str, str]:
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in head.get("env") or [] if "value" in e}


def job_commands(files: dict[str, list[dict]]) -> list[Command]:
    """Every `python jobs/<script>.py --config C key=value...` of the RayJobs in `files` ({file: objects}), its config
    loaded with the job's own loader and the driver's (head's) environment."""
    import importlib

    from mtn.config import load_config

    out = []
    for file, docs in sorted(files.items()):
        for job in by_kind(docs, "RayJob"):
            for argv in commands(job["spec"]["entrypoint"]):
                if len(argv) < 4 or argv[0] != "python" or argv[1] not in CONFIG_CLASSES or argv[2] != "--config":
                    continue
                module, name = CONFIG_CLASSES[argv[1]]
                with pytest.MonkeyPatch.context() as mp:
                    for key, value in head_env(job).items():
                        mp.setenv(key, value)
                    cfg = load_config(REPO / argv[3], argv[4:], cls=getattr(importlib.import_module(module), name))
                out.append(Command(f"k8s/{file}: RayJob/{job['metadata']['name']}", argv[1], cfg))
    return out


def served(where: str, rayservice: dict) -> list[Consumer]:
    """The registry translators a RayService's serveConfigV2 loads, with the pipeline it feeds them to."""
    args = serve_app(rayservice)["args"]
    return [Consumer(f"{where}: translators.{key}", uri, args["pipeline"])
            for key, uri in sorted((args.get("translators") or {}).items()) if uri.startswith("models:/")]


def consumed(cmds: list[Command]) -> list[Consumer]:
    """The registry translators the finetune jobs train through, with their base pipeline."""
    return [Consumer(f"{c.job}: translator", c.cfg.translator, c.cfg.pipeline) for c in cmds
            if c.script == "jobs/finetune_unet.py" and str(c.cfg.translator or "").startswith("models:/")]


# ------------------------------------------------------------------------------------------------ the check
def problems(consumers: list[Consumer], cmds: list[Command]) -> list[str]:
    """One line per consumed translator that no RayJob registers as asked, or registers in another target space."""
    registered: dict[str, list[Command]] = {}
    for c in cmds:
        if c.script == REGISTERS and c.cfg.register_model:
            registered.setdefault(c.cfg.register_model, []).append(c)
    out = []
    for con in consumers:
        m = MODEL_URI.fullmatch(con.uri)
        if m is None:
            out.append(f"{con.where}: {con.uri!r} is neither models:/<name>@<alias> nor models:/<name>/<version>")
            continue
        name = m["name"]
        if name not in registered:
            out.append(f"{con.where}: {con.uri} is registered by no RayJob in k8s/ (none runs {REGISTERS} with "
                       f"register_model={name}; registered there: {', '.join(sorted(registered)) or 'nothing'})")
            continue
        pipe_id, _, pipe_rev = con.pipeline.partition("@")
        for c in registered[name]:
            cfg = c.cfg
            if m["version"] is not None:
                out.append(f"{con.where}: {con.uri} pins version {m['version']}, but {c.job} registers a new version "
                           f"each run and moves @{cfg.register_alias}: serve models:/{name}@{cfg.register_alias}")
            elif m["alias"] != cfg.register_alias:
                out.append(f"{con.where}: {con.uri} asks for @{m['alias']}, but {c.job} moves "
                           f"@{cfg.register_alias} (register_alias)")
            if (cfg.target_encoder, cfg.target_subfolder) != (pipe_id, TEXT_ENCODER):
                out.append(f"{con.where}: {con.uri} from {c.job} translates into {cfg.target_encoder} "
                           f"(subfolder {cfg.target_subfolder}), but the pipeline {con.pipeline} reads "
                           f"{pipe_id} (subfolder {TEXT_ENCODER})")
            elif pipe_rev and cfg.target_revision and pipe_rev != cfg.target_revision:
                out.append(f"{con.where}: the pipeline is pinned to {pipe_rev}, but {c.job} translates into "
                           f"{cfg.target_encoder} at {cfg.target_revision}")
            if cfg.target_max_length != CONTEXT_TOKENS:
                out.append(f"{con.where}: {con.uri} from {c.job} has target_max_length {cfg.target_max_length}, "
                           f"but the pipeline's UNet reads {CONTEXT_TOKENS} tokens")
    return out


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def k8s_files() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


@pytest.fixture(scope="module")
def cmds(k8s_files) -> list[Command]:
    return job_commands(k8s_files)


@pytest.fixture(scope="module")
def chart_service() -> dict:
    (rs,) = by_kind(render(helm_path()), "RayService")
    return rs


def _fake_service(translators: dict, pipeline: str = "stable-diffusion-v1-5/stable-diffusion-v1-5") -> dict:
    """A RayService as a render would give it, with these app args only."""
    config = {"applications": [{"name": "mtn", "import_path": "serve.app:build_app",
                                "args": {"pipeline": pipeline, "translators": translators}}]}
    return {"kind": "RayService", "metadata": {"name": "fake"}, "spec": {"serveConfigV2": yaml.safe_dump(config)}}


# ------------------------------------------------------------------------------------------------ the repo
def test_what_is_served_and_consumed_is_what_a_job_registers(chart_service, cmds):
    consumers = served("helm template mtn-serve helm/mtn-serve", chart_service) + consumed(cmds)
    names = {MODEL_URI.fullmatch(c.uri)["name"] for c in consumers}
    assert {"mtn-xlmr-large-sd15", "mtn-t5-3b-sd15"} <= names, consumers  # the check is not vacuous
    found = problems(consumers, cmds)
    assert not found, "\n".join(["served or consumed but not registered as asked:", *found])


def test_plain_rayservice_is_checked_too(k8s_files, cmds):
    (rs,) = by_kind(k8s_files["rayservice.yaml"], "RayService")
    consumers = served("k8s/rayservice.yaml", rs)
    assert consumers and problems(consumers, cmds) == []


def test_extraction_and_training_share_data_and_caches(cmds):
    """The train RayJob reads exactly the caches the extraction RayJob writes, from the same corpus and encoders."""
    extract = [c for c in cmds if c.script == "jobs/extract_features.py"]
    assert extract, "no RayJob in k8s/ runs jobs/extract_features.py"
    keys = ("data_root", "languages", "source_file", "target_file", "feature_cache", "val_feature_cache",
            "source_encoder", "source_revision", "target_encoder", "target_subfolder", "target_revision",
            "source_max_length", "target_max_length", "cache_target_padding")
    for ex in extract:
        assert ex.cfg.feature_cache.startswith("s3://") and ex.cfg.val_feature_cache.startswith("s3://")
        trains = [c for c in cmds if c.script == REGISTERS and c.cfg.feature_cache == ex.cfg.feature_cache]
        assert trains, f"{ex.job}: no training RayJob reads {ex.cfg.feature_cache}"
        for tr in trains:
            differ = {k: (getattr(ex.cfg, k), getattr(tr.cfg, k)) for k in keys
                      if getattr(ex.cfg, k) != getattr(tr.cfg, k)}
            assert not differ, f"{ex.job} and {tr.job} differ: {differ}"
            assert tr.cfg.storage_path.startswith("s3://") and tr.cfg.register_model


def test_fetch_encoders_downloads_the_configs_hub_encoders(k8s_files, monkeypatch):
    """The extraction head's init container, run here against a stand-in snapshot_download: one download per hub
    encoder of the entrypoint's config, at its pinned revision, safetensors + config + tokenizer files only."""
    (job,) = by_kind(k8s_files["rayjob-extract-features.yaml"], "RayJob")
    (init,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["python", "-c"]
    script, config = init["args"]
    calls = []
    hub = types.ModuleType("huggingface_hub")
    hub.snapshot_download = lambda repo, revision=None, allow_patterns=None: calls.append(
        (repo, revision, allow_patterns)) or f"/hf/{repo}"
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["-c", config])
    exec(compile(script, "fetch-encoders", "exec"), {"__name__": "__main__"})  # noqa: S102 - the manifest's own code

    from mtn.config import load_config

    cfg = load_config(REPO / config)
    assert [(r, rev) for r, rev, _ in calls] == [(cfg.source_encoder, cfg.source_revision),
                                                 (cfg.target_encoder, cfg.target_revision)]
    source_files, target_files = calls[0][2], calls[1][2]
    assert "*.safetensors" in source_files and not any(f.endswith((".bin", ".h5", ".msgpack")) for f in source_files)
    assert {f"{TEXT_ENCODER}/*.safetensors", "tokenizer/*.json"} <= set(target_files)
    assert all(f.startswith((f"{TEXT_ENCODER}/", "tokenizer/")) for f in target_files)  # not the UNet or the VAE


# ------------------------------------------------------------------------------------------------ the check itself
def test_an_unregistered_name_is_reported(cmds):
    consumers = served("fake", _fake_service({"multi": "models:/mtn-nobody@champion", "de": "s3://b/translators/de"}))
    assert [c.uri for c in consumers] == ["models:/mtn-nobody@champion"]  # folders are not registry names
    (line,) = problems(consumers, cmds)
    assert line.startswith("fake: translators.multi: models:/mtn-nobody@champion is registered by no RayJob in k8s/")
    assert "register_model=mtn-nobody" in line and "mtn-xlmr-large-sd15" in line


def test_alias_version_and_target_space_mismatches_are_reported(cmds):
    (train,) = [c for c in cmds if c.script == REGISTERS and c.cfg.register_model == "mtn-xlmr-large-sd15"]
    ok = _fake_service({"multi": "models:/mtn-xlmr-large-sd15@champion"})
    assert problems(served("fake", ok), cmds) == []
    cases = {
        "models:/mtn-xlmr-large-sd15@staging": "asks for @staging, but k8s/rayjob-train-mtn.yaml",
        "models:/mtn-xlmr-large-sd15/3": "pins version 3",
        "models:/mtn-xlmr-large-sd15": "is neither models:/<name>@<alias>",
    }
    for uri, expected in cases.items():
        (line,) = problems(served("fake", _fake_service({"multi": uri})), cmds)
        assert expected in line, line
    sd14 = _fake_service({"multi": "models:/mtn-xlmr-large-sd15@champion"}, pipeline="CompVis/stable-diffusion-v1-4")
    (line,) = problems(served("fake", sd14), cmds)
    assert "translates into stable-diffusion-v1-5/stable-diffusion-v1-5" in line
    assert "the pipeline CompVis/stable-diffusion-v1-4 reads" in line
    at_rev = Command(train.job, REGISTERS, train.cfg.model_copy(update={"target_revision": "0123abc"}))
    for rev, expected in (("0123abc", []), ("4567def", ["is pinned to 4567def"])):
        pinned = _fake_service({"multi": "models:/mtn-xlmr-large-sd15@champion"},
                               pipeline=f"stable-diffusion-v1-5/stable-diffusion-v1-5@{rev}")
        found = problems(served("fake", pinned), [at_rev])
        assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found, strict=True)), found
    short = Command(train.job, REGISTERS, train.cfg.model_copy(update={"target_max_length": 64}))
    (line,) = problems(served("fake", ok), [short])
    assert "target_max_length 64" in line and "77 tokens" in line


def test_entrypoint_commands_are_split_like_a_shell():
    assert commands("python a.py --config c.yaml 'languages=[de, fr]' && python b.py x=1; echo done") == [
        ["python", "a.py", "--config", "c.yaml", "languages=[de, fr]"], ["python", "b.py", "x=1"], ["echo", "done"]]


def test_a_chained_command_is_read(k8s_files):
    """A RayJob whose entrypoint runs extraction then training: both commands are found and loaded."""
    docs = copy.deepcopy(k8s_files["rayjob-train-mtn.yaml"])
    (job,) = by_kind(docs, "RayJob")
    train = job["spec"]["entrypoint"]
    job["spec"]["entrypoint"] = train.replace("jobs/train_mtn.py", "jobs/extract_features.py") + " && " + train
    found = job_commands({"chained.yaml": docs})
    assert [c.script for c in found] == ["jobs/extract_features.py", "jobs/train_mtn.py"]
    assert found[0].cfg.feature_cache == found[1].cfg.feature_cache
