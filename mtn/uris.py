"""Model folders by URI: a local folder, `s3://bucket/prefix` (fsspec/s3fs, standard AWS settings incl.
AWS_ENDPOINT_URL for MinIO), or an MLflow artifact URI (`runs:/<run>/translator`, `models:/<name>/<version>`,
`models:/<name>@<alias>`, `mlflow-artifacts:/...`): a registered version is a pyfunc model logged by
mtn.mlflow_models (the folder sits in its artifacts/) or, registered by older versions, the folder itself. Remote
folders are downloaded once into a cache keyed by the URI.

A Hugging Face hub id, `org/name` or `org/name@revision` (a branch, tag or commit), is read from the HF cache
(HF_HOME, by huggingface_hub's snapshot_download): downloaded there first when the hub is reachable, read from the
cache alone under HF_HUB_OFFLINE=1, and never copied into the MTN cache (the HF cache is already per node and
atomic). A local folder of the same spelling wins over the hub id. A pipeline (marker model_index.json) downloads
only the files diffusers loads, without the safety checker.

The cache is shared by every process on a node (Serve replicas, Ray workers):

    <cache>/<key>/                 a complete download (holds `.complete`); appears by one atomic rename
    <key>.part-XXXX/               a download in progress (or left by a killed process: removed by the next one)
    <key>.lock                     a file lock: one process downloads, the others wait and then use its copy
    <key>.failed                   a failed download remembered for `retry_after_s` (JSON: error, retry_at), so a
                                   broken URI does not cost a download per request; delete it to retry sooner

`models:/name@alias` and `models:/name/latest` are resolved to their version first, so moving an alias is never
served from the copy of the old version. Settings (keyword arguments, else environment):
MTN_FETCH_TIMEOUT_S (1800: the whole download), MTN_FETCH_RETRY_AFTER_S (60; 0 disables the failure memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from mtn.errors import MTNError

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
TIMEOUT_ENV, RETRY_ENV = "MTN_FETCH_TIMEOUT_S", "MTN_FETCH_RETRY_AFTER_S"
DEFAULT_TIMEOUT_S, DEFAULT_RETRY_AFTER_S = 1800.0, 60.0
_CHUNK = 4 << 20  # bytes per read: the download deadline is checked between chunks
_clock = time.monotonic  # the deadline's clock (tests replace it to stop a download at a chosen chunk)
# org/name[@revision]: the hub's repo id characters; a revision is a branch, tag or 40-hex commit (branches may hold /)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+)"
                     r"(?:@(?P<revision>[A-Za-z0-9_.][A-Za-z0-9_./-]*))?")
PIPELINE_MARKER = "model_index.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MTN_CACHE", Path.home() / ".cache" / "mtn")) / "models"


def _setting(value: float | None, env: str, default: float) -> float:
    if value is not None:
        return float(value)
    raw = os.environ.get(env)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise MTNError(f"{env}={raw!r} is not a number of seconds") from None


def fetch_folder(uri: str, marker: str, cache_dir: str | Path | None = None, timeout_s: float | None = None,
                 retry_after_s: float | None = None) -> Path:
    """A local folder holding `marker` (e.g. "translator.json", "model_index.json") for `uri`.
    Remote copies land in `cache_dir/<sha of store + uri>`, downloaded by one process at a time."""
    uri = str(uri)
    if not uri.startswith(("s3://", *MLFLOW_SCHEMES)):
        path = Path(uri).expanduser()
        if not path.is_dir():
            hub = parse_hub_id(uri)
            if hub is None:
                raise MTNError(f"model folder not found: {uri}")
            return _find_marker(hub_snapshot(*hub, marker=marker), marker, uri)
        return _find_marker(path, marker, uri)
    timeout_s = _setting(timeout_s, TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    retry_after_s = _setting(retry_after_s, RETRY_ENV, DEFAULT_RETRY_AFTER_S)
    cache = Path(cache_dir or default_cache_dir())
    # models:/name/1 names different models in different MLflow stores: the store is part of the cache key
    store = _tracking_uri() if uri.startswith(MLFLOW_SCHEMES) else ""
    # failures are remembered per URI as given, checked before resolving it: an outage costs no request at all
    failed = cache / f"{_key(store, uri)}.failed"
    _raise_if_failed_recently(failed, retry_after_s)
    try:
        # an alias/latest -> its version; a job's stable s3:// output -> the version its _PUBLISHED pointer names
        # (mtn/publish.py): each version gets its own cache entry and a half-uploaded one is never read
        resolved = _resolve_registry_uri(uri) if store else _resolve_published(uri)
    except MTNError as e:
        cache.mkdir(parents=True, exist_ok=True)
        _remember_failure(failed, uri, str(e), retry_after_s)
        raise
    key = _key(store, resolved)
    dest = cache / key
    if (dest / ".complete").is_file():
        return _find_marker(dest, marker, uri)
    cache.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock, Timeout

    # a waiter gives up a little after the holder's own deadline (the holder then has failed or finished)
    lock = FileLock(str(cache / f"{key}.lock"), timeout=timeout_s + 30)
    try:
        with lock:
            if (dest / ".complete").is_file():  # another process finished it while this one waited
                return _find_marker(dest, marker, uri)
            _raise_if_failed_recently(failed, retry_after_s)  # ... or failed it: do not try again at once
            _download_locked(uri, resolved, marker, cache, key, failed, timeout_s, retry_after_s)
    except Timeout:
        raise MTNError(f"{uri}: another process on this node has held the download lock {lock.lock_file} for "
                       f"over {timeout_s + 30:.0f} s; is it stuck?") from None
    return _find_marker(dest, marker, uri)


def _download_locked(uri: str, resolved: str, marker: str, cache: Path, key: str, failed: Path, timeout_s: float,
                     retry_after_s: float) -> None:
    """Download into a fresh temp folder, check it, then publish it with one rename. Holds the key's lock."""
    dest = cache / key
    for stale in [*cache.glob(f"{key}.part*"), dest]:  # left by a killed process (nobody else holds the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.part-", dir=cache))
    try:
        deadline = _clock() + timeout_s
        if uri.startswith("s3://"):
            _download_s3(resolved, tmp, deadline, timeout_s)
        else:
            _download_mlflow(uri, resolved, tmp, deadline, timeout_s)
        _find_marker(tmp, marker, uri)  # a download without the marker is never cached as complete
        (tmp / ".complete").write_text(uri)
        os.rename(tmp, dest)  # atomic: other processes see no folder or a complete one
    except MTNError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remember_failure(failed, uri, str(e), retry_after_s)
        raise
    except BaseException:  # interrupted (KeyboardInterrupt, SystemExit): no trace, nothing remembered
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failed.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- Hugging Face hub
def parse_hub_id(uri: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) for a hub id `org/name` / `org/name@revision` that is not a local folder;
    None for anything else (a path: ./x, /x, ~/x, a/b/c; a URI with a scheme)."""
    uri = str(uri)
    m = _HUB_ID.fullmatch(uri)
    if m is None or Path(uri).expanduser().is_dir():
        return None
    repo, revision = m.group("repo"), m.group("revision")
    if ".." in repo or "--" in repo or repo.endswith((".", "-")) or (revision and ".." in revision):
        return None  # the hub refuses such names; as paths they would escape the cache's layout
    return repo, revision


def hub_snapshot(repo_id: str, revision: str | None = None, marker: str | None = None) -> Path:
    """The HF cache's snapshot folder of a hub repo at `revision` (default main), downloaded into the cache first
    when the hub is reachable. `marker` model_index.json: only the files a diffusers pipeline loads (no single-file
    checkpoints, variants or safety checker). Anything that fails is one MTNError line."""
    try:
        if marker == PIPELINE_MARKER:
            from diffusers import DiffusionPipeline

            return Path(DiffusionPipeline.download(repo_id, revision=revision, safety_checker=None))
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline cache misses, HTTP, validation errors: one line for the user
        error = e
    cached = _cached_snapshot(repo_id, revision)
    spec = f"{repo_id}@{revision}" if revision else repo_id
    if cached is None:
        raise MTNError(hub_error(repo_id, revision, error))
    if marker and not any(cached.rglob(marker)):
        raise MTNError(f"{spec} holds no {marker}: not the kind of folder expected here")
    raise MTNError(f"cannot read hub model {spec} (cached at {cached}): {type(error).__name__}: {_one_line(error)}")


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder the HF cache holds for repo_id at revision, without asking the hub; None when none."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not even a valid id)
        return None


def hub_error(repo_id: str, revision: str | None, e: BaseException) -> str:
    """The one line for a hub model that is neither cached nor downloadable."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    reason = _one_line(e)
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    how = ("unset HF_HUB_OFFLINE to download it" if offline else
           "check the id, the revision and access to the hub (HF_TOKEN for gated repos)")
    spec = f"{repo_id}@{revision}" if revision else repo_id
    where = f"{constants.HF_HUB_CACHE}{' (HF_HUB_OFFLINE=1)' if offline else ' and cannot be downloaded'}"
    return (f"{spec} is not a local folder, and hub model {repo_id} (revision {revision or 'main'}) is not in the "
            f"Hugging Face cache {where}: "
            f"set HF_HOME to a cache that holds it, pre-populate the cache (hf download {repo_id}"
            f"{f' --revision {revision}' if revision else ''}), or {how} [{type(e).__name__}: {reason}]")


def _key(store: str, uri: str) -> str:
    return hashlib.sha256(f"{store}|{uri}".encode()).hexdigest()[:16]


def _resolve_published(uri: str) -> str:
    from mtn.publish import resolve_published

    try:
        return resolve_published(uri)
    except Exception as e:  # s3fs/botocore raise several families; one line for the user
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MTNError(f"cannot read the publish pointer of {uri} ({type(e).__name__}: {first})") from None


# ----------------------------------------------------------------------------------------------- failure memory
def _remember_failure(path: Path, uri: str, error: str, retry_after_s: float) -> None:
    if retry_after_s <= 0:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"uri": uri, "error": error, "retry_at": time.time() + retry_after_s}))
    os.replace(tmp, path)  # readers in other processes see the old record or the new one, never half of one


def _raise_if_failed_recently(path: Path, retry_after_s: float) -> None:
    if retry_after_s <= 0:
        return
    try:
        record = json.loads(path.read_text())
        retry_at, error = float(record["retry_at"]), str(record["error"])
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError, OSError):  # unreadable record: ignore it, the download decides
        return
    wait = retry_at - time.time()
    if wait > 0:
        when = time.strftime("%H:%M:%S UTC", time.gmtime(retry_at))
        raise MTNError(f"{error} [failed recently: not retried before {when} (in {wait:.0f} s); "
                       f"delete {path} to retry now]")


# ----------------------------------------------------------------------------------------------- sources
def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _resolve_registry_uri(uri: str) -> str:
    """`models:/name@alias` and `models:/name/latest` -> `models:/name/<version>` (the version is what is cached);
    any other URI as given."""
    if not uri.startswith("models:/"):
        return uri
    parts = uri[len("models:/"):].split("/")
    if len(parts) == 1 and "@" in parts[0]:
        name, alias = parts[0].rsplit("@", 1)
        what = f"alias {alias!r}"
    elif len(parts) == 2 and parts[1].lower() == "latest":
        name, alias = parts[0], None
        what = "its latest version"
    else:
        return uri
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient()
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    except Exception as e:  # noqa: BLE001 - MlflowException, REST errors, no versions: one line for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MTNError(f"cannot resolve {uri} ({what}) in MLflow ({_tracking_uri()}): {msg}") from None
    return f"models:/{name}/{version}"


def _s3fs(uri: str, timeout_s: float):
    import fsspec

    # per-request bounds (a dead endpoint fails in seconds, not after botocore's defaults); one fresh instance:
    # s3fs is not fork-safe and a cached one may carry another process's event loop
    config = {"connect_timeout": min(10.0, timeout_s), "read_timeout": min(60.0, timeout_s),
              "retries": {"max_attempts": 2, "mode": "standard"}}
    return fsspec.core.url_to_fs(uri, skip_instance_cache=True, config_kwargs=config)


def _safe_relpath(key: str, root: str, uri: str) -> str:
    """The path of listed `key` under the download folder; refuses keys that would land outside it."""
    rel = key[len(root) + 1:] if key.startswith(root + "/") else key.rsplit("/", 1)[-1]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", "..") for p in parts) or "\x00" in rel:
        raise MTNError(f"refusing {uri}: listed key {key!r} would land outside the cache folder")
    return rel


def _download_s3(uri: str, dest: Path, deadline: float, timeout_s: float) -> None:
    try:
        fs, root = _s3fs(uri, timeout_s)
        root = root.rstrip("/")
        files = [f for f in fs.find(root) if not f.endswith("/")]
    except MTNError:
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp errors: one line for the user
        raise MTNError(f"cannot list {uri}: {_one_line(e)}") from None
    if not files:
        raise MTNError(f"nothing found under {uri}")
    plan = [(f, dest / _safe_relpath(f, root, uri)) for f in files]  # checked before anything is written
    top = dest.resolve()
    for f, local in plan:
        if not local.resolve().is_relative_to(top):
            raise MTNError(f"refusing {uri}: listed key {f!r} would land outside the cache folder")
    for f, local in plan:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with fs.open(f, "rb", block_size=_CHUNK) as src, open(local, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    if _clock() > deadline:
                        raise MTNError(f"downloading {uri} took over {timeout_s:.0f} s ({TIMEOUT_ENV}); gave up")
        except MTNError:
            raise
        except Exception as e:  # noqa: BLE001 - connection lost, object gone mid-download
            raise MTNError(f"cannot download {uri}: s3://{f}: {_one_line(e)}") from None
        if _clock() > deadline:
            raise MTNError(f"downloading {uri} took over {timeout_s:.0f} s ({TIMEOUT_ENV}); gave up")


def _download_mlflow(uri: str, resolved: str, dest: Path, deadline: float, timeout_s: float) -> None:
    """MLflow's own download on a helper thread, bounded by the deadline. A download that overruns keeps running
    in the background into its temp folder (MLflow has no cancel); that folder is never published."""
    import mlflow

    outcome: dict = {}

    def work():
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=str(dest))
        except Exception as e:  # noqa: BLE001 - reported by the caller
            outcome["error"] = e
        outcome["done"] = True

    thread = threading.Thread(target=work, name="mtn-mlflow-download", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - _clock()))
    if not outcome.get("done"):
        raise MTNError(f"downloading {uri} from MLflow took over {timeout_s:.0f} s ({TIMEOUT_ENV}); gave up")
    if "error" in outcome:
        shown = uri if resolved == uri else f"{uri} (= {resolved})"
        raise MTNError(f"cannot download {shown} from MLflow ({_tracking_uri()}): {_one_line(outcome['error'])}")
    top = dest.resolve()
    for p in dest.rglob("*"):  # a symlinked artifact must not point outside the cache
        if p.is_symlink() and not p.resolve().is_relative_to(top):
            raise MTNError(f"refusing {uri}: artifact {p.relative_to(dest)} links outside the cache folder")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _find_marker(root: Path, marker: str, uri: str) -> Path:
    """The folder holding `marker`: the root itself, or the least nested folder that has it. MLflow artifacts keep
    the logged folder's name (runs:/abc/translator -> <dst>/translator/translator.json), and a model logged by
    mtn.mlflow_models keeps its folders under artifacts/ (models:/name@champion -> <dst>/artifacts/<folder>/)."""
    if (root / marker).is_file():
        return root
    hits = sorted(p.parent for p in root.rglob(marker))
    if not hits:
        raise MTNError(f"{uri} holds no {marker}: not the kind of folder expected here")
    return min(hits, key=lambda p: len(p.parts))
