"""bench/provenance.py: every result row a bench script appends names the git commit it was measured at."""

import json
import subprocess

import pytest

from bench import provenance


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A throwaway git checkout with one commit, as provenance's ROOT (the cached commit is cleared around it)."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "rows.jsonl").write_text("")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    provenance.git_commit.cache_clear()
    yield tmp_path, git("rev-parse", "HEAD")
    provenance.git_commit.cache_clear()


def test_clean_checkout_is_the_head_commit_and_appending_rows_keeps_it_clean(repo):
    root, head = repo
    rows = root / "bench" / "results" / "rows.jsonl"
    provenance.append_rows(rows, [{"row": "a", "token_mse": 0.1}])
    assert json.loads(rows.read_text()) == {"row": "a", "token_mse": 0.1, "git_commit": head}
    provenance.git_commit.cache_clear()  # rows.jsonl now differs from HEAD: results do not make the tree dirty
    assert provenance.git_commit() == head


def test_changed_or_new_files_mark_the_commit_dirty(repo):
    root, head = repo
    (root / "code.py").write_text("x = 2\n")
    assert provenance.git_commit() == head + "-dirty"
    (root / "code.py").write_text("x = 1\n")
    provenance.git_commit.cache_clear()
    (root / "new_config.yaml").write_text("lr: 1\n")  # untracked, not ignored: it can change a run
    assert provenance.git_commit() == head + "-dirty"


def test_the_commit_is_fixed_at_the_first_call(repo):
    root, head = repo
    assert provenance.git_commit() == head
    (root / "code.py").write_text("x = 3\n")  # changed while the benchmark runs: its rows keep the start commit
    assert provenance.git_commit() == head


def test_outside_git_it_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find a checkout above it
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == "unknown"
    finally:
        provenance.git_commit.cache_clear()


def test_copied_rows_keep_their_own_commit_or_none(tmp_path, repo):
    path = tmp_path / "out" / "rows.jsonl"
    provenance.append_rows(path, [{"row": "b", "git_commit": "abc123"}, {"row": "c"}], stamp=False)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"row": "b", "git_commit": "abc123"},
                                                                       {"row": "c"}]
