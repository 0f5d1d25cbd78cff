"""Model folders by URI: a local folder, `s3://bucket/prefix` (fsspec/s3fs, standard AWS settings incl.
AWS_ENDPOINT_URL for MinIO), or an MLflow artifact URI (`runs:/<run>/translator`, `models:/<name>/<version>`,
`mlflow-artifacts:/...`). Remote folders are downloaded once into a cache keyed by the URI."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from mtn.errors import MTNError

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MTN_CACHE", Path.home() / ".cache" / "mtn")) / "models"


def fetch_folder(uri: str, marker: str, cache_dir: str | Path | None = None) -> Path:
    """A local folder holding `marker` (e.g. "translator.json", "model_index.json") for `uri`.
    Remote copies land in `cache_dir/<sha of uri>`; an incomplete earlier download is redone."""
    uri = str(uri)
    if not uri.startswith(("s3://", *MLFLOW_SCHEMES)):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise MTNError(f"model folder not found: {uri}")
        return _find_marker(path, marker, uri)
    # models:/name/1 names different models in different MLflow stores: the store is part of the cache key
    store = _tracking_uri() if uri.startswith(MLFLOW_SCHEMES) else ""
    dest = Path(cache_dir or default_cache_dir()) / hashlib.sha256(f"{store}|{uri}".encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.is_file():
        if dest.exists():
            shutil.rmtree(dest)
        tmp = dest.with_name(dest.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _download(uri, tmp)
            _find_marker(tmp, marker, uri)  # a download without the marker is never cached as complete
        except MTNError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(dest)
        done.write_text(uri)
    return _find_marker(dest, marker, uri)


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _download(uri: str, dest: Path) -> None:
    if uri.startswith("s3://"):
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        files = [f for f in fs.find(root) if not f.endswith("/")]
        if not files:
            raise MTNError(f"nothing found under {uri}")
        for f in files:
            local = dest / os.path.relpath(f, root.rstrip("/"))
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(local))
        return
    import mlflow

    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
    except Exception as e:  # MlflowException, REST errors: one line for the user
        raise MTNError(f"cannot download {uri} from MLflow ({_tracking_uri()}):"
                       f" {str(e).splitlines()[0]}") from None


def _find_marker(root: Path, marker: str, uri: str) -> Path:
    """The folder holding `marker`: the root itself, or the one nested folder that has it (MLflow artifacts
    keep the logged folder's name, e.g. runs:/abc/translator -> <dst>/translator/translator.json)."""
    if (root / marker).is_file():
        return root
    hits = sorted(p.parent for p in root.rglob(marker))
    if not hits:
        raise MTNError(f"{uri} holds no {marker}: not the kind of folder expected here")
    return min(hits, key=lambda p: len(p.parts))
