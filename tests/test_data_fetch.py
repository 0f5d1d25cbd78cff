"""`mtn data fetch` (mtn/data/fetch.py) against a loopback HTTP server with Range support; missing-data errors name
the command. The real manifest's files cannot be downloaded here: tests pass a manifest of generated files."""

import ast
import gzip
import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest

from mtn.data.fetch import MANIFEST, DataFile, fetch, fetch_command, fetch_hint
from mtn.errors import MTNError

ROOT = Path(__file__).resolve().parents[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET of server.files[path]; `Range: bytes=N-` answered 206 (416 past the end); server.cut[path] = k sends the
    full Content-Length but only k bytes, then drops the connection (once)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        srv, path = self.server, self.path.lstrip("/")
        srv.requests.append((path, self.headers.get("Range")))
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get("Range")
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = srv.cut.pop(path, None)
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, server): server.files {path: bytes}, server.requests [(path, Range header)], server.cut."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut = {}, [], {}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    srv.shutdown()
    srv.server_close()


def _entry(path: str, data: bytes) -> DataFile:
    return DataFile(path, f"https://example.invalid/{path}", hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def dataset(server):
    """A manifest like the real one (two datasets, gzip + tsv) and the server holding its files."""
    _, srv = server
    files = {"multi30k/train.de.gz": gzip.compress("\n".join(f"ein hund {i}" for i in range(3000)).encode()),
             "multi30k/train.en.gz": gzip.compress(b"a dog\n" * 100),
             "prompts/PartiPrompts.tsv": b"Prompt\tCategory\nan owl\tAnimals\n"}
    srv.files.update(files)
    manifest = {"multi30k": [_entry(p, d) for p, d in files.items() if p.startswith("multi30k/")],
                "prompts": [_entry("prompts/PartiPrompts.tsv", files["prompts/PartiPrompts.tsv"])]}
    return manifest, files


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fetch_then_refetch_does_nothing(tmp_path, server, dataset):
    url, srv = server
    manifest, files = dataset
    out = fetch(["all"], root=str(tmp_path / "data"), base_url=url, manifest=manifest, progress=False,
                log=lambda *_: None)
    assert sorted(out) == sorted(f"{tmp_path}/data/{p}" for p in files)
    for path, data in files.items():
        assert (tmp_path / "data" / path).read_bytes() == data
    assert _leftovers(tmp_path / "data") == sorted(files)  # no .part file left
    assert len(srv.requests) == 3
    lines = []
    fetch(["multi30k", "prompts"], root=str(tmp_path / "data"), base_url=url, manifest=manifest, log=lines.append)
    assert len(srv.requests) == 3, "a re-fetch must not download present files"
    assert len(lines) == 3 and all(line.endswith("present (sha256 ok)") for line in lines)


def test_base_url_from_environment_and_a_changed_file_is_replaced(tmp_path, server, dataset, monkeypatch):
    url, srv = server
    manifest, files = dataset
    monkeypatch.setenv("MTN_DATA_BASE_URL", url)
    root = tmp_path / "data"
    (root / "prompts").mkdir(parents=True)
    (root / "prompts" / "PartiPrompts.tsv").write_bytes(b"Prompt\nedited by hand\n")
    lines = []
    fetch(["prompts"], root=str(root), manifest=manifest, progress=False, log=lines.append)
    assert (root / "prompts" / "PartiPrompts.tsv").read_bytes() == files["prompts/PartiPrompts.tsv"]
    assert "not the pinned file" in lines[0] and srv.requests == [("prompts/PartiPrompts.tsv", None)]


def test_corrupted_server_file_fails_and_leaves_nothing(tmp_path, server, dataset):
    url, srv = server
    manifest, files = dataset
    srv.files["multi30k/train.en.gz"] = files["multi30k/train.en.gz"][:-1] + b"X"  # same size, other bytes
    bad = hashlib.sha256(srv.files["multi30k/train.en.gz"]).hexdigest()
    want = manifest["multi30k"][1].sha256
    with pytest.raises(MTNError) as e:
        fetch(["multi30k"], root=str(tmp_path / "data"), base_url=url, manifest=manifest, progress=False,
              log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"sha256 mismatch for multi30k/train.en.gz from {url}/multi30k/train.en.gz" in msg
    assert f"expected {want}, got {bad}" in msg
    assert _leftovers(tmp_path / "data") == ["multi30k/train.de.gz"]  # the good file before it; no partial


def test_interrupted_download_resumes_with_range(tmp_path, server, dataset):
    url, srv = server
    manifest, files = dataset
    name = "multi30k/train.de.gz"
    n = len(files[name]) // 3
    srv.cut[name] = n
    root = tmp_path / "data"
    with pytest.raises(MTNError, match=rf"{name} .*after {n} .*run the command again to resume"):
        fetch(["multi30k"], root=str(root), base_url=url, manifest=manifest, progress=False, log=lambda *_: None)
    assert not (root / name).exists()  # nothing unverified in place
    assert (root / (name + ".part")).read_bytes() == files[name][:n]
    fetch(["multi30k"], root=str(root), base_url=url, manifest=manifest, progress=False, log=lambda *_: None)
    assert srv.requests[-2] == (name, f"bytes={n}-")  # the resume asked for the rest only
    assert (root / name).read_bytes() == files[name]
    assert _leftovers(root) == ["multi30k/train.de.gz", "multi30k/train.en.gz"]


def test_network_down_is_one_line(tmp_path, dataset):
    manifest, _ = dataset
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MTNError) as e:
        fetch(["prompts"], root=str(tmp_path), base_url=f"http://127.0.0.1:{port}", manifest=manifest,
              progress=False, timeout=5)
    assert str(e.value).startswith(f"cannot download prompts/PartiPrompts.tsv from http://127.0.0.1:{port}/")
    assert "\n" not in str(e.value) and not _leftovers(tmp_path)
    with pytest.raises(MTNError, match="unknown dataset 'coco': one of multi30k, prompts, or all"):
        fetch(["coco"], root=str(tmp_path), manifest=manifest)


def test_s3_data_root(tmp_path, server, dataset, s3_endpoint, monkeypatch):
    import boto3

    url, srv = server
    manifest, files = dataset
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where partial downloads of a remote root go
    boto3.client("s3").create_bucket(Bucket="mtn-data")
    out = fetch(["all"], root="s3://mtn-data/shared", base_url=url, manifest=manifest, progress=False,
                log=lambda *_: None)
    assert sorted(out) == sorted(f"s3://mtn-data/shared/{p}" for p in files)
    s3 = boto3.client("s3")
    for path, data in files.items():
        assert s3.get_object(Bucket="mtn-data", Key=f"shared/{path}")["Body"].read() == data
    assert not _leftovers(tmp_path / "cache")  # staged parts are removed once uploaded
    n = len(srv.requests)
    fetch(["all"], root="s3://mtn-data/shared", base_url=url, manifest=manifest, progress=False, log=lambda *_: None)
    assert len(srv.requests) == n
    # what the jobs then read from there
    from mtn.data.corpus import read_lines

    assert read_lines("s3://mtn-data/shared/multi30k/train.en.gz") == ["a dog"] * 100


def test_cli_data_fetch(tmp_path, server, dataset, monkeypatch, capsys):
    from mtn import cli
    from mtn.data import fetch as fetch_module

    url, _ = server
    manifest, files = dataset
    monkeypatch.setattr(fetch_module, "MANIFEST", manifest)
    monkeypatch.setenv("MTN_SHARED_DATA", str(tmp_path / "default-root"))
    assert cli.main(["data", "fetch", "prompts", "--base-url", url, "--quiet"]) == 0
    assert (tmp_path / "default-root/prompts/PartiPrompts.tsv").read_bytes() == files["prompts/PartiPrompts.tsv"]
    assert cli.main(["data", "fetch", "multi30k", "--root", str(tmp_path / "r"), "--base-url", url, "--quiet"]) == 0
    assert _leftovers(tmp_path / "r") == ["multi30k/train.de.gz", "multi30k/train.en.gz"]
    capsys.readouterr()
    assert cli.main(["data", "fetch", "nope", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown dataset 'nope': one of multi30k, prompts, or all"


# ----------------------------------------------------------------------------------------------- manifest & hints
def _config_data_paths() -> set[str]:
    """Every multi30k/ and prompts/ path under data_root that a config or the Multi30k bench reads."""
    from mtn.config import load_config
    from mtn.eval.config import EvalConfig

    paths = set()
    for lang in ("de", "fr", "cs"):
        cfg = load_config(ROOT / "jobs/configs/multi30k.yaml", [f"source_lang={lang}", "data_root=/D"])
        paths |= {cfg.source_file, cfg.target_file, cfg.val_source_file, cfg.val_target_file}
    ev = EvalConfig(data_root="/D")  # the class defaults: Multi30k test_2016 + PartiPrompts
    paths |= {ev.for_lang(ev.align_source_file, lang) for lang in ("en", "de", "fr", "cs")} | {ev.prompts}
    tree = ast.parse((ROOT / "bench/multi30k.py").read_text())
    test_sets = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TEST_SETS")
    paths |= {f"/D/multi30k/{ts}.{lg}.gz" for lg, sets in test_sets.items() for ts in sets}
    paths |= {f"/D/multi30k/{ts}.en.gz" for sets in test_sets.values() for ts in sets}
    return {p.removeprefix("/D/") for p in paths}


def test_manifest_covers_every_path_the_configs_read():
    pinned = {f.path for files in MANIFEST.values() for f in files}
    needed = _config_data_paths()
    assert "multi30k/train.cs.gz" in needed and "prompts/PartiPrompts.tsv" in needed
    assert needed <= pinned, sorted(needed - pinned)
    entries = [f for files in MANIFEST.values() for f in files]
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in entries)
    # every file pinned to its own digest and source (a digest or URL copied onto another entry is caught here; the
    # digests' values against the real bytes: test_manifest_matches_a_shared_copy)
    assert len({f.sha256 for f in entries}) == len({f.url for f in entries}) == len({f.path for f in entries}) \
        == len(entries) == 16
    for f in entries:
        assert f.url.startswith("https://raw.githubusercontent.com/") and f.url.endswith("/" + Path(f.path).name)


def test_manifest_matches_a_shared_copy():
    """Where ../shared/data exists (a developer's checkout, CI), its files are the public ones: same bytes."""
    from mtn.config import SHARED_DATA

    present = [f for files in MANIFEST.values() for f in files if (Path(SHARED_DATA) / f.path).is_file()]
    if not present:
        pytest.skip("no shared data copy beside this checkout")
    for f in present:
        data = (Path(SHARED_DATA) / f.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256), f.path


def test_missing_data_names_the_fetch_command(tmp_path):
    from mtn.data.corpus import load_pairs, read_lines
    from mtn.eval.prompts import read_prompts

    root = tmp_path / "nodata"
    with pytest.raises(MTNError, match=re.escape(f"(run: mtn data fetch multi30k --root {root})")):
        load_pairs(f"{root}/multi30k/test_2016_flickr.de.gz", f"{root}/multi30k/test_2016_flickr.en.gz")
    with pytest.raises(MTNError, match=re.escape(f"(run: mtn data fetch prompts --root {root})")):
        read_prompts(f"{root}/prompts/PartiPrompts.tsv")
    with pytest.raises(MTNError, match=r"corpus file not found: \S+other.txt$"):  # not one of ours: no hint
        read_lines(str(tmp_path / "other.txt"))
    assert fetch_hint("s3://b/d/multi30k/val.cs.gz") == " (run: mtn data fetch multi30k --root s3://b/d)"
    assert fetch_command("/d/multi30k/val.de.gz,/d/multi30k/val.fr.gz") == "mtn data fetch multi30k --root /d"
    assert fetch_command("/d/multi30k/unknown.gz") is None


def test_jobs_say_the_fetch_command_before_any_work(tmp_path, capsys):
    """The evaluate and train jobs check their data first: a fresh clone gets the command, not a trained model and
    then a FileNotFoundError."""
    import jobs.evaluate
    import jobs.train_mtn

    root = tmp_path / "nodata"
    rc = jobs.evaluate.main([f"data_root={root}", f"output_dir={tmp_path}/eval", f"translator={tmp_path}/none",
                             "align_source_file={data_root}/multi30k/test_2016_flickr.{lang}.gz"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (f"error: data file not found: {root}/multi30k/test_2016_flickr.en.gz "
                                       f"(run: mtn data fetch multi30k --root {root})")
    rc = jobs.evaluate.main([f"data_root={root}", f"output_dir={tmp_path}/eval", f"translator={tmp_path}/none",
                             "prompts={data_root}/prompts/PartiPrompts.tsv"])
    assert rc == 2 and f"(run: mtn data fetch prompts --root {root})" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing was trained
    rc = jobs.train_mtn.main(["--config", str(ROOT / "jobs/configs/multi30k.yaml"), f"data_root={root}"])
    assert rc == 2 and f"run: mtn data fetch multi30k --root {root})" in capsys.readouterr().err
