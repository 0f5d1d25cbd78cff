"""Publishing never tears output_dir: a crash or a storage failure mid-publish leaves the previous output whole and
readable, and running again publishes (mtn/publish.py). Local: real process deaths; s3://: a real (moto) S3 server
stopped part-way through the upload."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtn import publish as pub
from mtn.errors import MTNError

NAMES = ("translator", "loss_curve.png", "metrics.json")


def make_checkpoint(root: Path, tag: str, names=NAMES) -> Path:
    """A final checkpoint's artifacts: a translator folder of several files, a plot, metrics; each says `tag`."""
    root.mkdir(parents=True)
    if "translator" in names:
        (root / "translator" / "mtn").mkdir(parents=True)
        (root / "translator" / "translator.json").write_text(json.dumps({"tag": tag}))
        for i in range(3):
            (root / "translator" / "mtn" / f"part{i}.bin").write_bytes(tag.encode() * 1000)
    if "loss_curve.png" in names:
        (root / "loss_curve.png").write_bytes(b"png-" + tag.encode())
    (root / "metrics.json").write_text(json.dumps({"tag": tag}))
    return root


def read_output(out: Path) -> dict:
    """Every published file by relative path -> its bytes; what a reader of output_dir sees."""
    return {str(p.relative_to(out)): p.read_bytes() for name in NAMES for p in
            ([out / name] if (out / name).is_file() else sorted((out / name).rglob("*"))) if p.is_file()}


def expected(ckpt: Path) -> dict:
    return read_output(ckpt)


def test_local_publish_replaces_the_whole_set_and_drops_names_the_new_version_lacks(tmp_path):
    out = tmp_path / "out"
    v1, v2 = make_checkpoint(tmp_path / "v1", "one"), make_checkpoint(tmp_path / "v2", "two", ("metrics.json",))
    (out / "ray_results").mkdir(parents=True)  # output_dir also holds things publish must not touch
    where = pub.publish(v1, str(out), NAMES)
    assert where == {n: str(out / n) for n in NAMES} and read_output(out) == expected(v1)
    pub.publish(v2, str(out), NAMES)  # e.g. a baseline: no translator, no loss curve
    assert read_output(out) == expected(v2) and not (out / "translator").exists()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "ray_results"]  # no staging left behind


def test_local_copy_failure_leaves_the_previous_output_and_a_rerun_publishes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    v1, v2 = make_checkpoint(tmp_path / "v1", "one"), make_checkpoint(tmp_path / "v2", "two")
    pub.publish(v1, str(out), NAMES)
    real_copy, calls = pub._copy_local, []

    def disk_full_on_second(src, dst):
        calls.append(src.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src, dst)

    monkeypatch.setattr(pub, "_copy_local", disk_full_on_second)
    with pytest.raises(MTNError, match=r"failed while copying .*No space left.* previous output there is unchanged"):
        pub.publish(v2, str(out), NAMES)
    assert read_output(out) == expected(v1) and not list(out.glob(".publish-*"))
    monkeypatch.setattr(pub, "_copy_local", real_copy)
    pub.publish(v2, str(out), NAMES)
    assert read_output(out) == expected(v2)


CRASH = textwrap.dedent("""
    import os, sys, types
    from pathlib import Path
    from mtn import publish as pub
    where, count = sys.argv[1], int(sys.argv[3])
    calls = []
    def die(*args, _real={"copy": pub._copy_local, "replace": os.replace}[where]):
        calls.append(1)
        if len(calls) == count:
            os._exit(9)  # the process dies here: no except, no finally, no cleanup
        return _real(*args)
    if where == "copy":
        pub._copy_local = die
    else:
        pub.os = types.SimpleNamespace(**{**vars(os), "replace": die})
    pub.publish(Path(sys.argv[2]), sys.argv[4], ("translator", "loss_curve.png", "metrics.json"))
""")


@pytest.mark.parametrize("where,count", [("copy", 2), ("replace", 3)])
def test_local_process_killed_mid_publish(tmp_path, where, count):
    """killed while copying: the old output is intact, the next publish removes the leftovers; killed after the
    commit marker, between the renames of the switch: the next publish finishes that switch first (roll forward)."""
    out = tmp_path / "out"
    v1, v2, v3 = (make_checkpoint(tmp_path / f"v{i}", f"tag{i}") for i in (1, 2, 3))
    pub.publish(v1, str(out), NAMES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run([sys.executable, "-c", CRASH, where, str(v2), str(count), str(out)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 9, p.stderr[-2000:]
    (stage,) = out.glob(".publish-*")
    if where == "copy":
        assert read_output(out) == expected(v1)  # untouched: nothing had switched
        assert not (stage / pub.COMPLETE).exists()
    else:  # replace #1 wrote the marker, #2 switched the translator, then death before loss_curve.png
        assert (stage / pub.COMPLETE).exists()
        assert read_output(out)["translator/translator.json"] == b'{"tag": "tag2"}'
        assert read_output(out)["metrics.json"] == b'{"tag": "tag1"}'  # mixed until recovered
        pub.recover(out)
        assert read_output(out) == expected(v2) and not list(out.glob(".publish-*"))
    pub.publish(v3, str(out), NAMES)
    assert read_output(out) == expected(v3) and not list(out.glob(".publish-*"))


def test_local_publish_over_an_output_dir_written_before_versioning(tmp_path):
    out = tmp_path / "out"
    old = make_checkpoint(out, "legacy")  # names written in place by the old copy_artifacts
    assert read_output(out) == expected(old)
    new = make_checkpoint(tmp_path / "new", "new")
    pub.publish(new, str(out), NAMES)
    assert read_output(out) == expected(new)


# ----------------------------------------------------------------------------------------------- s3
def s3_read(output_dir: str) -> dict:
    """What a reader gets through the pointer: every published file -> bytes (the translator via fetch_folder)."""
    from mtn.uris import fetch_folder

    fs, _ = pub.filesystem(output_dir)
    version = pub.read_pointer(output_dir, fs)["version"]
    folder = fetch_folder(pub.resolve_published(f"{output_dir}/translator"), "translator.json",
                          cache_dir=Path(os.environ["MTN_TEST_CACHE"]))
    files = {f"translator/{p.relative_to(folder)}": p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    for name in ("loss_curve.png", "metrics.json"):
        files[name] = fs.cat_file(f"{output_dir}/versions/{version}/{name}")
    return files


@pytest.fixture
def moto(monkeypatch):
    """A moto S3 server on loopback that the test may stop and restart on the same port (moto keeps the objects in
    this process). -> a list holding the running server (replace it on restart)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_MAX_ATTEMPTS": "1"}.items():  # botocore's retries would only slow the failure down
        monkeypatch.setenv(k, v)
    running = [server]
    yield running
    for s in running:
        s.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_server_stopped_mid_publish_keeps_the_previous_version_readable(tmp_path, monkeypatch, moto):
    import s3fs
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("MTN_TEST_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("runs")
    out = "s3://runs/mtn/out"
    v1, v2 = make_checkpoint(tmp_path / "v1", "one"), make_checkpoint(tmp_path / "v2", "two")
    where = pub.publish(v1, out, NAMES)
    first = pub.read_pointer(out)["version"]
    assert where["translator"] == f"{out}/versions/{first}/translator"
    assert pub.resolve_published(f"{out}/translator") == where["translator"]
    assert s3_read(out) == expected(v1)

    # the second publish: the S3 server goes away after 2 of its 6 files
    real_upload, uploads = pub._upload, []

    def upload_then_stop(fs, local, remote):
        real_upload(fs, local, remote)
        uploads.append(remote)
        if len(uploads) == 2:
            moto.pop().stop()

    monkeypatch.setattr(pub, "_upload", upload_then_stop)
    with pytest.raises(MTNError, match=rf"publishing to {out} failed after 2 of 6 files \(.*\); the published "
                                       rf"output \(version {first}\) is unchanged: run the job again"):
        pub.publish(v2, out, NAMES)
    # the server back on its port: the pointer still names the first version, whole and readable
    host, port = os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)
    moto.append(ThreadedMotoServer(ip_address=host.split("//")[1], port=int(port)))
    moto[0].start()
    assert pub.read_pointer(out)["version"] == first
    assert s3_read(out) == expected(v1)
    monkeypatch.setattr(pub, "_upload", real_upload)
    pub.publish(v2, out, NAMES)  # the re-run publishes
    assert s3_read(out) == expected(v2)
    # kept: the current and the previous version; the failed attempt's partial upload is gone
    fs, _ = pub.filesystem(out)
    versions = {p.rsplit("/", 1)[-1] for p in fs.ls("runs/mtn/out/versions", detail=False)}
    assert versions == {first, pub.read_pointer(out)["version"]}


def test_fetch_folder_reads_the_published_version_of_a_stable_address(tmp_path, moto):
    """Readers (serve, evaluate) given s3://.../translator get the version _PUBLISHED names, each in its own cache
    entry, so a re-publish is fetched anew and a half-uploaded version is never read."""
    import s3fs

    from mtn.uris import fetch_folder

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("readers")  # moto keeps buckets per process: a fresh one
    out = "s3://readers/mtn/out"
    cache = tmp_path / "cache"
    pub.publish(make_checkpoint(tmp_path / "v1", "one"), out, NAMES)
    first = fetch_folder(f"{out}/translator", "translator.json", cache_dir=cache)
    assert json.loads((first / "translator.json").read_text()) == {"tag": "one"}
    pub.publish(make_checkpoint(tmp_path / "v2", "two"), out, NAMES)
    second = fetch_folder(f"{out}/translator", "translator.json", cache_dir=cache)
    assert second != first
    assert json.loads((second / "translator.json").read_text()) == {"tag": "two"}
    assert (second / "mtn" / "part0.bin").read_bytes() == b"two" * 1000
