"""RELIABILITY.md names the test that shows each row: every one of them must exist, so a renamed or deleted test
cannot leave a row that nothing backs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def named_tests() -> list[tuple[str, str]]:
    """(file, test function) for every `tests/x.py::name` and following `::name` in the table rows."""
    out = []
    for line in (ROOT / "RELIABILITY.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        last_file = None
        for m in re.finditer(r"(tests/[\w/]+\.py)?::(\w+)", line.split("|")[-2]):
            last_file = m.group(1) or last_file
            out.append((last_file, m.group(2)))
    return out


def test_every_test_named_in_reliability_md_exists():
    named = named_tests()
    assert len(named) >= 30  # the table has rows for jobs, data, service and cluster
    missing = [f"{f}::{t}" for f, t in named
               if f is None or not re.search(rf"^(async )?def {t}\b", (ROOT / f).read_text(), re.M)]
    assert missing == []
