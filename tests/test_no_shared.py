"""Every embedded default runs on a fresh clone that has no ../shared beside it: generated captions, generated
parallel test sets and generated prompts, each said in the config as `generated:`."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtn.cli import _resolved
from mtn.config import SHARED_DATA
from mtn.tiny.captions import PARALLEL_LANGS, generate_prompts, parallel_captions, parse_generated

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMMANDS = ("train", "extract", "sweep", "evaluate", "finetune", "precompute", "serve")


def _strings(value, key=""):
    """(dotted key, string) of every string in a resolved config (nested mappings and lists included)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


def _shared_paths(cfg: dict, roots: list[str]) -> list[str]:
    """Keys (other than data_root itself) whose value names something under a shared data root."""
    return [f"{k}={v}" for k, v in _strings(cfg) if k != "data_root"
            and any(root in part for root in roots for part in v.split(","))]


@pytest.mark.parametrize("command", DEFAULT_COMMANDS)
def test_default_config_reads_no_shared_data(command, tmp_path, monkeypatch):
    """`mtn config show <command>` with no --config: no field points under the shared data folder (where a clone
    has none), whatever $MTN_SHARED_DATA says."""
    missing = str(tmp_path / "no-shared" / "data")
    monkeypatch.setenv("MTN_SHARED_DATA", missing)
    roots = [missing, SHARED_DATA, "shared/data"]
    cfg = _resolved(command, None, [])
    assert _shared_paths(cfg, roots) == []
    if command == "sweep":  # every trial runs the base config with the base overrides
        base = _resolved("train", str(ROOT / cfg["base_config"]), cfg["base_overrides"])
        assert _shared_paths(base, roots) == [] and base["corpus"].startswith("generated:")
    if command in ("train", "extract"):
        assert cfg["corpus"].startswith("generated:")
    if command == "evaluate":
        assert [cfg["align_source_file"], cfg["align_target_file"], cfg["prompts"]] == \
            ["generated:300:{lang}", "generated:300:en", "generated:16"]
    # the check itself: a field under the missing root is found
    assert _shared_paths({"data_root": missing, "x": f"{missing}/multi30k/val.de.gz"}, roots) == \
        [f"x={missing}/multi30k/val.de.gz"]


def test_generated_parallel_sets_are_aligned():
    en, de, fr = (parallel_captions(50, lang) for lang in ("en", "de", "fr"))
    assert len(en) == len(de) == len(fr) == 50 and en == parallel_captions(50, "en")
    assert en != de != fr and parallel_captions(50, "en", seed=3) != en
    for e, d, f in zip(en, de, fr, strict=True):  # row i is the same scene: the same subject in every language
        for subject in (("dog", "hund", "chien"), ("cat", "katze", "chat"), ("fox", "fuchs", "renard")):
            assert (f" {subject[0]} " in e) == (f" {subject[1]} " in d) == (f" {subject[2]} " in f)
    assert parallel_captions(3, "de")[:1] == parallel_captions(1, "de")  # a prefix of a longer set
    assert len(set(generate_prompts(40))) > 30 and generate_prompts(5, "fr") != generate_prompts(5, "en")
    assert all(p.startswith(("un", "une")) for p in generate_prompts(20, "fr"))
    assert set(PARALLEL_LANGS) == {"en", "de", "fr"}
    assert parse_generated("generated:12") == (12, None) and parse_generated("generated:7:de") == (7, "de")
    for bad in ("generated:x", "generated:0", "generated:5:cs", "generated:1:de:2"):
        with pytest.raises(ValueError, match="generated"):
            parse_generated(bad)


def test_generated_specs_in_corpora_and_prompts():
    from mtn.data.corpus import load_pairs, read_lines
    from mtn.errors import MTNError
    from mtn.eval.prompts import read_parallel, read_prompts

    pairs = load_pairs("generated:20:de", "generated:20:en")
    assert pairs == list(zip(parallel_captions(20, "de"), parallel_captions(20, "en"), strict=True))
    assert read_lines("generated:5") != read_lines("generated:5:en")  # training captions vs the held-out test set
    assert read_prompts("generated:16", limit=4) == generate_prompts(4)
    assert read_parallel("generated:8:de", "generated:8:en") == (generate_prompts(8, "de"), generate_prompts(8))
    with pytest.raises(MTNError, match="corpus 'generated:5:xx': .*en, de, fr"):
        read_lines("generated:5:xx")
    with pytest.raises(MTNError, match="prompts 'generated:-1'"):
        read_prompts("generated:-1")


def _clone(dest: Path) -> Path:
    """The checkout's files (tracked, and new files not ignored) as they are now, copied into dest/repo: a clone
    with nothing beside it."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    repo = dest / "repo"
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():  # deleted-but-tracked files are skipped
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    assert not (repo.parent / "shared").exists()
    return repo


@pytest.mark.slow
def test_train_then_evaluate_on_a_clone_without_shared(tmp_path):
    """`mtn train` then `mtn evaluate`, no arguments, cwd = a copy of the repo that has no ../shared (and
    $MTN_SHARED_DATA naming a folder that does not exist): both exit 0 and write their outputs."""
    repo = _clone(tmp_path / "clone")
    mtn = Path(sys.executable).parent / "mtn"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS",
                                                             "MTN_DATA_BASE_URL")}
    # the copy's code, not the editable install's (that one sits beside ../shared)
    env |= {"MTN_SHARED_DATA": str(tmp_path / "missing" / "data"), "PYTHONPATH": str(repo)}
    for command in ("train", "evaluate"):
        proc = subprocess.run([str(mtn), command], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, f"mtn {command}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (repo / "outputs/local/translator/translator.json").is_file()
    out = repo / "outputs/eval-local"
    for name in ("alignment.csv", "generation.csv", "metrics.json", "tsne.png"):
        assert (out / name).is_file(), name
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["language"] for r in metrics["alignment"]] == ["en", "de"]
    assert all(r["pairs"] == 300 for r in metrics["alignment"])
    assert metrics["notes"]["prompts"] == 16
    assert not (tmp_path / "missing").exists()
