"""Which code a benchmark row was measured with: every bench script that appends rows to bench/results/*.jsonl
writes them through `append_rows`, which adds `"git_commit"` to each row.

    git_commit()  ->  "<git rev-parse HEAD>", + "-dirty" when the checkout differs from it, or "unknown" outside git

The value is taken once per process (the first call; bench scripts make it at the start of `main`), so every row
of one command names the commit the command started from, even if the tree changes while it runs. Changes under
bench/results/ do not count as dirty: appending rows there is what the benchmarks themselves do.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.cache
def git_commit() -> str:
    """HEAD's full hash, + "-dirty" if tracked or untracked (not ignored) files differ from it; "unknown" if ROOT is
    not a git checkout or git cannot be run."""
    head = _git("rev-parse", "--verify", "HEAD")
    if not head:
        return "unknown"
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    if status is None:
        return "unknown"
    return head + ("-dirty" if status else "")


def append_rows(path: Path, rows: list[dict], *, stamp: bool = True) -> None:
    """Append `rows` to the JSON-lines file `path`, each with `"git_commit": git_commit()` when `stamp` (a row
    copied from an earlier measurement passes stamp=False and keeps the commit it was measured at, if any)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, "git_commit": git_commit()} if stamp else row) + "\n")
