"""`mtn data fetch multi30k | prompts`: the public data files the real-data configs read, downloaded into a data root
(a local folder or any fsspec URL such as s3://bucket/data) laid out exactly as the jobs read them:

    <root>/multi30k/{train,val,test_2016_flickr}.{en,de,fr,cs}.gz, <root>/multi30k/test_2017_flickr.{en,de,fr}.gz
    <root>/prompts/PartiPrompts.tsv

    mtn data fetch multi30k                               # into $MTN_SHARED_DATA (default ../shared/data)
    mtn data fetch multi30k prompts --root s3://my-bucket/data
    mtn data fetch all --base-url http://mirror.internal/mtn-data     # a mirror laid out like a data root

Every file is pinned by sha256 (MANIFEST). A download goes to a temporary `.part` file (beside the target for a
local root, under ~/.cache/mtn/data-fetch for a remote one), is checked, then renamed (uploaded) into place, so a
data root never holds a half-written or unverified file. An interrupted download resumes with an HTTP Range request
on the next run; files already present with the right sha256 are skipped. A sha256 mismatch deletes the download
and names the file, the URL, the expected and the received digest.

Sources: the Multi30k task-1 raw files of github.com/multi30k/dataset (data/task1/raw) and PartiPrompts.tsv of
github.com/google-research/parti, each at a pinned commit. The gzip files are served as they are stored in those
repositories (no transfer encoding), and those bytes are what the jobs read: the digests below are of these exact
bytes. `--base-url URL` (or $MTN_DATA_BASE_URL) fetches `URL/<path under the root>` instead, for mirrors and tests.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mtn.errors import MTNError

MULTI30K_COMMIT = "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
PARTI_COMMIT = "5a657978134374ce28973948331b319adef164bd"
_MULTI30K_URL = f"https://raw.githubusercontent.com/multi30k/dataset/{MULTI30K_COMMIT}/data/task1/raw"
_PARTI_URL = f"https://raw.githubusercontent.com/google-research/parti/{PARTI_COMMIT}"
CHUNK = 1 << 16


@dataclass(frozen=True)
class DataFile:
    path: str  # under the data root (and under --base-url): multi30k/train.de.gz
    url: str  # the public source
    sha256: str
    size: int


def _multi30k(name: str, sha256: str, size: int) -> DataFile:
    return DataFile(f"multi30k/{name}", f"{_MULTI30K_URL}/{name}", sha256, size)


MANIFEST: dict[str, list[DataFile]] = {
    "multi30k": [
        _multi30k("train.en.gz", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f", 568929),
        _multi30k("train.de.gz", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6", 637044),
        _multi30k("train.fr.gz", "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c", 604242),
        _multi30k("train.cs.gz", "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077", 593827),
        _multi30k("val.en.gz", "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28", 21650),
        _multi30k("val.de.gz", "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a", 24681),
        _multi30k("val.fr.gz", "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9", 23001),
        _multi30k("val.cs.gz", "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc", 22096),
        _multi30k("test_2016_flickr.en.gz", "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9", 21077),
        _multi30k("test_2016_flickr.de.gz", "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8", 22890),
        _multi30k("test_2016_flickr.fr.gz", "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90", 22310),
        _multi30k("test_2016_flickr.cs.gz", "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1", 22572),
        # Multi30k has no Czech test_2017_flickr set
        _multi30k("test_2017_flickr.en.gz", "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074", 19138),
        _multi30k("test_2017_flickr.de.gz", "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee", 21471),
        _multi30k("test_2017_flickr.fr.gz", "3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496", 20434),
    ],
    "prompts": [
        DataFile("prompts/PartiPrompts.tsv", f"{_PARTI_URL}/PartiPrompts.tsv",
                 "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb", 123107),
    ],
}


def default_root() -> str:
    """Where the configs look for data by default: $MTN_SHARED_DATA, else the `data_root` config default."""
    from mtn.config import SHARED_DATA

    return os.environ.get("MTN_SHARED_DATA") or SHARED_DATA


def fetch_command(path: str, manifest: dict[str, list[DataFile]] | None = None) -> str | None:
    """`mtn data fetch <name> --root <its data root>` for a file (the first of a comma list) that a dataset here
    provides, else None."""
    path = str(path).split(",")[0].strip()
    for name, files in (manifest or MANIFEST).items():
        for f in files:
            if path == f.path or path.endswith("/" + f.path):
                return f"mtn data fetch {name} --root {path[: -len(f.path)].rstrip('/') or '.'}"
    return None


def fetch_hint(path: str, manifest: dict[str, list[DataFile]] | None = None) -> str:
    """` (run: mtn data fetch ...)` for a missing file that a dataset here provides, else ""."""
    cmd = fetch_command(path, manifest)
    return f" (run: {cmd})" if cmd else ""


def fetch(names: list[str], root: str | None = None, base_url: str | None = None,
          manifest: dict[str, list[DataFile]] | None = None, progress: bool = True, timeout: float = 60.0,
          log=print) -> list[str]:
    """Download the named datasets ("all" for every one) into `root`; returns the files' URLs/paths under it.
    Raises MTNError (one line) on a network failure or a sha256 mismatch."""
    import fsspec

    manifest = manifest or MANIFEST
    wanted = list(manifest) if "all" in names else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in manifest]
    if unknown:
        raise MTNError(f"unknown dataset {unknown[0]!r}: one of {', '.join(manifest)}, or all")
    root = (root or default_root()).rstrip("/")
    base_url = (base_url or os.environ.get("MTN_DATA_BASE_URL") or "").rstrip("/") or None
    try:
        fs, root_path = fsspec.core.url_to_fs(root)
    except (ValueError, ImportError) as e:
        raise MTNError(f"data root {root}: {e}") from None
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    out = []
    for name in wanted:
        for f in manifest[name]:
            url = f"{base_url}/{f.path}" if base_url else f.url
            dest = f"{root_path.rstrip('/')}/{f.path}"
            out.append(f"{root}/{f.path}")
            state = _state(fs, dest, f)
            if state == "ok":
                log(f"{root}/{f.path}: present (sha256 ok)")
                continue
            if state == "differs":
                log(f"{root}/{f.path}: present but not the pinned file (size or sha256 differs): downloading it")
            part = Path(dest + ".part") if local else _staging(root) / (f.path + ".part")
            _download(url, part, f, progress, timeout)
            _install(fs, local, part, dest, root, f)
            log(f"{root}/{f.path}: downloaded ({f.size} bytes, sha256 ok)")
    return out


def _state(fs, dest: str, f: DataFile) -> str:
    """"ok" (present, the pinned bytes), "missing", or "differs"."""
    try:
        if not fs.isfile(dest):
            return "missing"
        if fs.size(dest) != f.size:
            return "differs"
        with fs.open(dest, "rb") as fh:
            return "ok" if _sha256(fh) == f.sha256 else "differs"
    except OSError as e:
        raise MTNError(f"cannot read {dest}: {e.strerror or e}") from None


def _staging(root: str) -> Path:
    """Local folder for a remote root's partial downloads (kept between runs, so they resume)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtn" / "data-fetch"
    return cache / hashlib.sha256(root.encode()).hexdigest()[:16]


def _sha256(fh) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: fh.read(CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def _download(url: str, part: Path, f: DataFile, progress: bool, timeout: float) -> None:
    """url -> part, resuming a partial part with a Range request; then part's sha256 is checked (deleted if wrong)."""
    from tqdm import tqdm

    try:
        part.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MTNError(f"cannot write into {part.parent}: {e.strerror or e}") from None
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # not a prefix of the file we want: start again
        part.unlink()
        have = 0
    if have < f.size:
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        got, expected = have, f.size
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if have and resp.status != 206:  # the server ignored the Range: the whole file again
                    have = got = 0
                length = resp.headers.get("Content-Length")
                expected = have + int(length) if length is not None else f.size
                with open(part, "ab" if have else "wb") as out, \
                        tqdm(total=expected, initial=have, unit="B", unit_scale=True, desc=f.path,
                             disable=not progress, leave=False) as bar:
                    for chunk in iter(lambda: resp.read(CHUNK), b""):
                        out.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:  # 416 on a resume: the part already holds the whole file
                raise MTNError(f"cannot download {f.path}: {url} answered HTTP {e.code} {e.reason}") from None
            expected = got
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise MTNError(f"cannot download {f.path} from {url}: {reason}"
                           + (f" (after {got} bytes; run the command again to resume)" if got else "")) from None
        if got < expected:
            raise MTNError(f"download of {f.path} from {url} stopped after {got} of {expected} bytes; "
                           "run the command again to resume")
    with open(part, "rb") as fh:
        digest = _sha256(fh)
    if digest != f.sha256:
        part.unlink()
        raise MTNError(f"sha256 mismatch for {f.path} from {url}: expected {f.sha256}, got {digest} "
                       "(the download was deleted)")


def _install(fs, local: bool, part: Path, dest: str, root: str, f: DataFile) -> None:
    """The verified part -> its place under the root: a rename on local disk, one upload (a whole object) else."""
    try:
        if local:
            os.replace(part, dest)
        else:
            fs.put_file(str(part), dest)
            part.unlink()
    except OSError as e:
        raise MTNError(f"cannot write {root}/{f.path}: {e.strerror or e}") from None


def require_files(paths) -> None:
    """MTNError for the first of `paths` (comma lists too; `generated:` specs and None skipped) that does not exist,
    naming the `mtn data fetch` command that provides it where one does. Checked before a job starts its work."""
    import fsspec

    for spec in dict.fromkeys(p for p in paths if p and not str(p).startswith("generated:")):
        for path in (x.strip() for x in str(spec).split(",") if x.strip()):
            try:
                fs, fs_path = fsspec.core.url_to_fs(path)
                found = fs.exists(fs_path)
            except Exception:  # credentials, endpoints, ...: the job's reader then says what is wrong
                continue
            if not found:
                raise MTNError(f"data file not found: {path}{fetch_hint(path)}")
