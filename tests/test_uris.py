"""mtn.uris.fetch_folder under faults, on a real S3 API (moto server on loopback) and real processes: one download
for four processes, a download killed mid-way, the endpoint dying mid-download, keys escaping the cache, the
failure memory, the whole-download deadline, MLflow aliases resolved to versions."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_faults import DyingEndpoint, request_log, upstream_of

import mtn.uris as uris
from mtn.errors import MTNError
from mtn.uris import fetch_folder

ROOT = Path(__file__).parents[1]
URI = "s3://models/tr"
FILES = {"translator.json": b'{"kind": "test"}', "weights.bin": os.urandom(1 << 20),
         "tok/tokenizer.json": b"{}" * 1000}


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".complete"}


WANT = {k: hashlib.sha256(v).hexdigest() for k, v in sorted(FILES.items())}


def complete_entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if (p / ".complete").is_file()] if cache.is_dir() else []


@pytest.fixture
def model(s3_endpoint):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    # moto keeps its objects in process-global state: another test's objects may still be there
    for obj in s3.list_objects_v2(Bucket="models").get("Contents", []):
        s3.delete_object(Bucket="models", Key=obj["Key"])
    for key, data in FILES.items():
        s3.put_object(Bucket="models", Key=f"tr/{key}", Body=data)
    return s3_endpoint


def run_child(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, procs, limit_s: float = 120):
    """Bounded wait for a file a child writes (fails if a child dies first)."""
    end = time.monotonic() + limit_s
    while not path.exists():
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, dead[0].stderr.read()[-2000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


FETCH_CHILD = """
import hashlib, json, sys, time
from pathlib import Path
from mtn.uris import fetch_folder
ready, gate, uri, cache = sys.argv[1:]
Path(ready).touch()
while not Path(gate).exists():  # all four start together (bounded by the parent's timeout)
    time.sleep(0.005)
p = fetch_folder(uri, "translator.json", cache_dir=cache)
files = {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest()
         for f in sorted(p.rglob("*")) if f.is_file() and f.name != ".complete"}
print(json.dumps({"path": str(p), "files": files}))
"""


@pytest.mark.slow
def test_four_processes_fetching_one_uri_download_it_once(model, tmp_path):
    cache, gate = tmp_path / "cache", tmp_path / "gate"
    with request_log() as requests:
        procs = [run_child(FETCH_CHILD, tmp_path / f"ready{i}", gate, URI, cache) for i in range(4)]
        try:
            for i in range(4):
                wait_for(tmp_path / f"ready{i}", procs)
            gate.touch()
            outs = [p.communicate(timeout=180) for p in procs]
        finally:
            for p in procs:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert len({r["path"] for r in results}) == 1 and all(r["files"] == WANT for r in results)
    # one download: each object fetched by exactly one process
    assert sorted(requests.object_gets("models", "tr/")) == sorted(f"tr/{k}" for k in FILES)
    assert len(complete_entries(cache)) == 1 and not list(cache.glob("*.part*")) and not list(cache.glob("*.failed"))


KILLED_CHILD = """
import sys, time
from pathlib import Path
import mtn.uris as u
ready, uri, cache = sys.argv[1:]
u._CHUNK = 64 << 10
real = u._clock
def clock():  # read after each chunk: park the download once two chunks of weights.bin are on disk
    part = list(Path(cache).glob("*.part-*/weights.bin"))
    if part and part[0].stat().st_size >= 128 << 10:
        Path(ready).touch()
        time.sleep(600)
    return real()
u._clock = clock
u.fetch_folder(uri, "translator.json", cache_dir=cache)
"""


@pytest.mark.slow
def test_a_download_killed_midway_leaves_nothing_complete_and_the_next_fetch_succeeds(model, tmp_path):
    import boto3

    cache = tmp_path / "cache"
    s3 = boto3.client("s3")  # weights.bin first in listing order: the kill lands inside it
    s3.delete_object(Bucket="models", Key="tr/translator.json")
    s3.put_object(Bucket="models", Key="tr/zz/translator.json", Body=FILES["translator.json"])
    proc = run_child(KILLED_CHILD, tmp_path / "ready", URI, cache)
    try:
        wait_for(tmp_path / "ready", [proc])
        parts = list(cache.glob("*.part-*"))
        assert len(parts) == 1 and 0 < (parts[0] / "weights.bin").stat().st_size < len(FILES["weights.bin"])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert complete_entries(cache) == [] and not list(cache.glob("*.failed"))  # a kill is no remembered failure
    folder = fetch_folder(URI, "translator.json", cache_dir=cache, timeout_s=120)  # the dead holder's lock is free
    assert folder.name == "zz" and (folder.parent / "weights.bin").read_bytes() == FILES["weights.bin"]
    assert not list(cache.glob("*.part*"))  # the killed download's leftovers are gone


def test_endpoint_dying_mid_download_caches_nothing_and_the_failure_is_remembered(model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    proxy = DyingEndpoint(upstream_of(model))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(uris, "_CHUNK", 64 << 10)
    real = uris._clock

    def clock():  # read after each chunk: S3 goes away once two chunks of weights.bin are on disk
        part = list(cache.glob("*.part-*/weights.bin"))
        if part and part[0].stat().st_size >= 128 << 10:
            proxy.kill()
        return real()

    monkeypatch.setattr(uris, "_clock", clock)
    with pytest.raises(MTNError, match=r"cannot download s3://models/tr: s3://models/tr/weights.bin: "):
        fetch_folder(URI, "translator.json", cache_dir=cache, timeout_s=60, retry_after_s=300)
    assert complete_entries(cache) == [] and not list(cache.glob("*.part*"))
    # the endpoint is back, but the failure is remembered: no new request until retry_at, and the error says when
    monkeypatch.setattr(uris, "_clock", real)
    monkeypatch.setenv("AWS_ENDPOINT_URL", model)
    with request_log() as requests, pytest.raises(MTNError, match=r"cannot download .*failed recently: not "
                                                  r"retried before \d\d:\d\d:\d\d UTC \(in (2\d\d|300) s\); delete "):
        fetch_folder(URI, "translator.json", cache_dir=cache, retry_after_s=300)
    assert requests.lines == []
    failed = next(cache.glob("*.failed"))
    record = json.loads(failed.read_text())
    failed.write_text(json.dumps({**record, "retry_at": time.time() - 1}))  # the memory expired
    assert digest(fetch_folder(URI, "translator.json", cache_dir=cache)) == WANT
    assert not failed.exists()


def test_keys_that_would_escape_the_cache_are_refused(s3_endpoint, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="models")
    for key in ("evil/translator.json", "evil/a/../../../outside.txt", "abs/translator.json", "abs//etc/x"):
        s3.put_object(Bucket="models", Key=key, Body=b"{}")
    cache = tmp_path / "cache"
    for uri, key in (("s3://models/evil", "evil/a/../../../outside.txt"), ("s3://models/abs", "abs//etc/x")):
        with pytest.raises(MTNError, match="would land outside the cache folder") as err:
            fetch_folder(uri, "translator.json", cache_dir=cache)
        assert f"models/{key}" in str(err.value)
    assert complete_entries(cache) == [] and not list(tmp_path.rglob("outside.txt"))
    assert not list(cache.glob("*.part*"))


def test_whole_download_deadline(model, tmp_path, monkeypatch):
    """A download slower than timeout_s gives up (a fake clock: 10 s pass per chunk read), caching nothing."""
    now = [0.0]

    def clock():
        now[0] += 10
        return now[0]

    monkeypatch.setattr(uris, "_CHUNK", 256 << 10)
    monkeypatch.setattr(uris, "_clock", clock)
    cache = tmp_path / "cache"
    with pytest.raises(MTNError, match=r"took over 25 s \(MTN_FETCH_TIMEOUT_S\); gave up"):
        fetch_folder(URI, "translator.json", cache_dir=cache, timeout_s=25)
    assert complete_entries(cache) == [] and not list(cache.glob("*.part*"))
    monkeypatch.setenv("MTN_FETCH_RETRY_AFTER_S", "0")  # memory off: the next (fast enough) fetch downloads
    monkeypatch.setattr(uris, "_clock", time.monotonic)
    assert digest(fetch_folder(URI, "translator.json", cache_dir=cache)) == WANT
    monkeypatch.setenv("MTN_FETCH_TIMEOUT_S", "soon")
    with pytest.raises(MTNError, match="MTN_FETCH_TIMEOUT_S='soon' is not a number"):
        fetch_folder("s3://models/other", "translator.json", cache_dir=cache)


def test_registry_alias_is_resolved_to_its_version(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow_store import register_plain_folder

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    for version in (1, 2):
        folder = tmp_path / f"v{version}"
        folder.mkdir()
        (folder / "translator.json").write_text(json.dumps({"v": version}))
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(folder), "translator")
        assert register_plain_folder(MlflowClient(), "m", run.info.run_id, "translator") == f"models:/m/{version}"
    client, cache = MlflowClient(), tmp_path / "cache"

    def version_of(model_uri):
        return json.loads((fetch_folder(model_uri, "translator.json", cache_dir=cache) / "translator.json")
                          .read_text())["v"]

    client.set_registered_model_alias("m", "champion", "1")
    assert version_of("models:/m@champion") == 1
    client.set_registered_model_alias("m", "champion", "2")  # the alias moved: not the cached copy of version 1
    assert version_of("models:/m@champion") == 2 and version_of("models:/m/latest") == 2
    assert version_of("models:/m/1") == 1
    assert len(complete_entries(cache)) == 2  # @champion shares the cache entries of versions 1 and 2
    with pytest.raises(MTNError, match=r"cannot resolve models:/m@nobody \(alias 'nobody'\)"):
        fetch_folder("models:/m@nobody", "translator.json", cache_dir=cache)


def test_unsafe_relative_paths_are_refused():
    for key in ("root/a/../../x", "root//etc/passwd", "root/a/./../b/.."):
        with pytest.raises(MTNError, match="outside the cache folder"):
            uris._safe_relpath(key, "root", "s3://root")
    assert uris._safe_relpath("root/a/b.json", "root", "s3://root") == "a/b.json"
    assert uris._safe_relpath("root", "root", "s3://root") == "root"  # the URI names one object


def test_local_paths_stay_paths_and_hub_ids_go_to_the_hf_cache(tmp_path, monkeypatch):
    """A missing path is "not found" as before; an org/name that is no folder is a hub id, read from the HF cache
    (empty here, offline: one line naming the id); an existing folder of that spelling is the folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for missing in ("./org/name", str(tmp_path / "org" / "name"), "outputs/local/translator", "~/no/such/folder"):
        with pytest.raises(MTNError, match="model folder not found"):
            fetch_folder(missing, "translator.json", cache_dir=tmp_path / "cache")
    with pytest.raises(MTNError, match=r"hub model org/name \(revision v1\) is not in the Hugging Face cache") as e:
        fetch_folder("org/name@v1", "translator.json", cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "translator.json").write_text("{}")
    assert fetch_folder("org/name", "translator.json", cache_dir=tmp_path / "cache") == Path("org/name")
    assert not (tmp_path / "cache").exists()
