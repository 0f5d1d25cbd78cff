"""The pinned Helm binary (scripts/get_helm.sh) driven from Python: locate it, run it, render a chart."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_helm() -> Path | None:
    """$HELM, else <repo>/.tools/bin/helm (scripts/get_helm.sh); None when neither is executable."""
    for candidate in (os.environ.get("HELM"), REPO_ROOT / ".tools" / "bin" / "helm"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def helm(*args: str, helm_bin: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    helm_bin = helm_bin or find_helm()
    if helm_bin is None:
        raise FileNotFoundError("helm not found: run scripts/get_helm.sh or set $HELM")
    return subprocess.run([str(helm_bin), *args], capture_output=True, text=True, check=check, timeout=120)


def helm_template(chart: str | Path, values_files=(), set_values=(), release: str = "mtn-serve") -> str:
    args = ["template", release, str(chart)]
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    proc = helm(*args)
    if proc.returncode:
        raise RuntimeError(f"helm template failed:\n{proc.stderr.strip()}")
    return proc.stdout
