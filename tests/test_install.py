"""`pip install .` gives a working `mtn` outside the checkout: the wheel carries the jobs' configs and the service's
files, and the installed CLI finds them (not the checkout's) from any directory. Cheap: the wheel is built without
dependencies and installed with --target beside the dev environment's packages, not into a fresh venv."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_a_cli_that_runs_outside_the_checkout(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("mtn", "jobs", "serve"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("mtn-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "jobs" / "configs").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"serve/config.yaml", "serve/page.html", "jobs/train_mtn.py", "mtn/cli.py", "serve/__main__.py"} <= names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mtn = mtn.cli:main" in entry_points

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the dev venv's dependencies stay importable; the installed copy comes first on the path, the checkout not at all
    env = {**os.environ, "PYTHONPATH": str(site)}
    mtn = [str(site / "bin" / "mtn")]

    def run(*args):
        p = subprocess.run([*mtn, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert all(f"  {c} " in run("--help") for c in ("train", "extract", "sweep", "evaluate", "finetune",
                                                      "precompute", "serve", "config show"))
    shown = run("config", "show", "train", "max_steps=7")
    assert shown.startswith(f"# mtn train: {site}/jobs/configs/local.yaml + overrides")  # the installed config
    assert "\nmax_steps: 7\n" in shown and "\nname: mtn-local\n" in shown
    where = subprocess.run([sys.executable, "-c", "import mtn, jobs, serve; print(mtn.__file__, jobs.__file__, "
                            "serve.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert all(f.startswith(str(site)) for f in where.stdout.split()), where.stdout
