"""Publishing a finished run's artifacts (translator/, pipeline/, metrics.json, ...) into output_dir, never torn.

A publish first writes a complete new copy beside the current one and switches to it at the end, so a crash or a
storage failure part-way leaves the previous output as it was, readable; running the job again publishes.

Local output_dir (readers open `<out>/translator` as before; nothing changes for them):

    <out>/.publish-<id>/new/<name>     the new copy, written first (a crash here: removed by the next publish)
    <out>/.publish-<id>/_COMPLETE      written (by rename) once every file is there: from then on the switch is
                                       finished by whoever comes next (a re-run's publish) if this process dies
    switch, per name                   files: one atomic os.replace; folders: the old one is renamed into
                                       .publish-<id>/old/ and the new one renamed into place (two renames, a
                                       microsecond apart), then .publish-<id>/ is deleted

s3:// output_dir (no rename in S3: a new prefix per publish and one pointer object written last):

    <out>/versions/<id>/<name>/...     the new copy, written first; never modified afterwards
    <out>/versions/<id>/_COMPLETE      after the files
    <out>/_PUBLISHED                   {"version": <id>, "names": [...], ...}: one PUT, the switch
    The current and the previous version are kept (a reader may still be downloading the previous one); older
    versions and failed publishes' leftovers are deleted by the next successful publish. Readers take the
    versioned URI the job prints, or resolve `<out>/<name>` through the pointer
    (`resolve_published`, what mtn.uris.fetch_folder should call for s3:// URIs).

One publisher per output_dir at a time (the driver of one run). A process crash is covered; data not yet flushed
by the OS when the machine itself loses power is not (no fsync).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from mtn.errors import MTNError

COMPLETE = "_COMPLETE"
POINTER = "_PUBLISHED"
VERSIONS = "versions"
STAGE_PREFIX = ".publish-"


def new_version_id() -> str:
    """Sorts by time (UTC, to the second) and stays unique across runs: 20261201T190512Z-3fa9c1."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def publish(src: Path, output_dir: str, names: tuple[str, ...], meta: dict | None = None) -> dict[str, str]:
    """Publish the named files/folders of `src` (a final checkpoint) to output_dir as one new version.
    `names` are all the names this job owns: ones missing from `src` (a baseline has no loss curve, a native-encoder
    finetune no translator) are removed from the output, so it never mixes runs. -> {name: URI to read it at}."""
    src = Path(src)
    record = {"version": new_version_id(), "names": [n for n in names if (src / n).exists()], "owned": list(names),
              **(meta or {})}
    if "://" in output_dir:
        return _publish_s3(src, output_dir.rstrip("/"), record)
    return _publish_local(src, Path(output_dir), record)


def resolve_published(uri: str) -> str:
    """`s3://b/out/translator` -> `s3://b/out/versions/<id>/translator` when `s3://b/out/_PUBLISHED` names it;
    any other URI unchanged. For readers given the stable name of a published output."""
    if not uri.startswith("s3://") or "/" not in uri.rstrip("/")[5:]:
        return uri
    parent, name = uri.rstrip("/").rsplit("/", 1)
    record = read_pointer(parent)
    if record is None or name not in record.get("names", []):
        return uri
    return f"{parent}/{VERSIONS}/{record['version']}/{name}"


def read_pointer(output_dir: str, fs=None) -> dict | None:
    """The `_PUBLISHED` record of an s3:// (or any fsspec) output_dir; None before its first versioned publish."""
    fs, root = (fs, filesystem(output_dir)[1]) if fs is not None else filesystem(output_dir)
    try:
        return json.loads(fs.cat_file(f"{root}/{POINTER}"))
    except FileNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------- local
def _publish_local(src: Path, out: Path, record: dict) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    recover(out)  # first finish (or drop) what an interrupted publish left
    stage = out / f"{STAGE_PREFIX}{record['version']}"
    try:
        (stage / "new").mkdir(parents=True)
        for name in record["names"]:
            _copy_local(src / name, stage / "new" / name)
        tmp = stage / f"{COMPLETE}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, stage / COMPLETE)  # the commit point: a marker that exists is whole
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise MTNError(f"publishing to {out} failed while copying ({e}); the previous output there is unchanged: "
                       "free the space / fix the error and run the job again to publish") from e
    _switch(out, stage, record)
    shutil.rmtree(stage, ignore_errors=True)
    return {name: str(out / name) for name in record["names"]}


def _copy_local(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _switch(out: Path, stage: Path, record: dict) -> None:
    """Move the staged names into `out`, the replaced ones into stage/old. Idempotent: a name already moved in is
    skipped, so a crash anywhere in here is finished by running it again (`recover`)."""
    new, old = stage / "new", stage / "old"
    old.mkdir(exist_ok=True)
    for name in record["owned"]:
        target = out / name
        if name in record["names"]:
            if not (new / name).exists() and not (new / name).is_symlink():
                continue  # switched before the crash
            if (new / name).is_dir() or target.is_dir():
                if target.exists() or target.is_symlink():
                    os.rename(target, old / name)
            os.replace(new / name, target)  # a file replaces a file atomically
        elif target.exists() or target.is_symlink():  # not in this version: the old one must not stay behind
            os.rename(target, old / name)


def recover(out: Path) -> None:
    """Finish the switch of a publish that died after writing its _COMPLETE marker; drop unfinished copies."""
    for stage in sorted(Path(out).glob(f"{STAGE_PREFIX}*")):
        try:
            record = json.loads((stage / COMPLETE).read_text())
        except (OSError, ValueError):
            record = None
        if record is not None:
            _switch(Path(out), stage, record)
            print(f"publish: finished the interrupted publish {record['version']} in {out}")
        shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- s3
def filesystem(uri: str):
    """-> (fsspec filesystem, path) for a local path or URI; s3:// gets a fresh instance (s3fs is not fork-safe,
    and a cached one may hold another endpoint or stale listings)."""
    import fsspec

    return fsspec.core.url_to_fs(uri, skip_instance_cache=True) if uri.startswith("s3://") else \
        fsspec.core.url_to_fs(uri)


def _upload(fs, local: Path, remote: str) -> None:
    fs.put_file(str(local), remote)


def _publish_s3(src: Path, output_dir: str, record: dict) -> dict[str, str]:
    fs, root = filesystem(output_dir)
    version = record["version"]
    base = f"{root}/{VERSIONS}/{version}"
    files = [(p, f"{base}/{p.relative_to(src).as_posix()}") for name in record["names"]
             for p in ([src / name] if (src / name).is_file() else sorted(x for x in (src / name).rglob("*")
                                                                         if x.is_file()))]
    done, previous = 0, None
    try:
        previous = (read_pointer(output_dir, fs) or {}).get("version")
        for local, remote in files:
            _upload(fs, local, remote)
            done += 1
        fs.pipe_file(f"{base}/{COMPLETE}", json.dumps(record).encode())
        fs.pipe_file(f"{root}/{POINTER}", json.dumps(record).encode())  # the switch: one PUT
    except Exception as e:  # s3fs/botocore raise several families (OSError, EndpointConnectionError, ClientError)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        was = f" (version {previous})" if previous else ""
        raise MTNError(f"publishing to {output_dir} failed after {done} of {len(files)} files ({reason}); the "
                       f"published output{was} is unchanged: run the job again to publish") from e
    _drop_old_versions(fs, root, keep={version, previous})
    return {name: f"{output_dir}/{VERSIONS}/{version}/{name}" for name in record["names"]}


def _drop_old_versions(fs, root: str, keep: set) -> None:
    """Every version but the current and the previous one; a failure here only leaves garbage behind."""
    try:
        stale = [p for p in fs.ls(f"{root}/{VERSIONS}", detail=False) if p.rstrip("/").rsplit("/", 1)[-1] not in keep]
        for p in stale:
            fs.rm(p, recursive=True)
    except Exception as e:
        print(f"warning: old published versions under {root}/{VERSIONS} were not deleted: "
              f"{(str(e).splitlines() or [type(e).__name__])[0]}")
