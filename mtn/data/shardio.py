"""Shard I/O for mtn.data.shards: shard URL lists (folders, globs, brace ranges, list files; local or s3://),
one filesystem per process (s3fs is not fork-safe), a streaming tar reader that groups webdataset members into
samples and tells a truncated archive from a complete one, and a read-ahead thread per sub-stream."""

from __future__ import annotations

import gzip
import logging
import os
import posixpath
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator

from mtn.errors import MTNError

log = logging.getLogger("mtn.data")

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_GLOB = re.compile(r"[*?\[]")
_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's grouping: key = path up to the first dot


# ----------------------------------------------------------------------------------------------- filesystems
_FILESYSTEMS: dict = {}


def filesystem(url: str):
    """(fsspec filesystem, path) for `url`; one instance per (process, protocol, endpoint): s3fs is not
    fork-safe and fsspec's instance cache would hand a forked DataLoader worker its parent's event loop."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    key = (os.getpid(), protocol, os.environ.get("AWS_ENDPOINT_URL"))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True)
        _FILESYSTEMS[key] = fs
    return fs, fs._strip_protocol(url)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _to_url(fs, path: str, local: bool) -> str:
    return path if local else fs.unstrip_protocol(path)


# ----------------------------------------------------------------------------------------------- listing
def expand_braces(pattern: str) -> list[str]:
    """`{00000..00099}` (zero padding kept) and `{a,b}` alternatives, nested and repeated, in order."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.fullmatch(body)
    if r:
        a, b = r.groups()
        width = max(len(a), len(b)) if (len(a) > 1 and a.startswith("0")) or (len(b) > 1 and b.startswith("0")) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [x for p in parts for x in expand_braces(head + p + tail)]


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


def _files(fs, infos, local: bool) -> list[str]:
    """Shard URLs among fsspec `detail=True` entries (a dict or a list of dicts): files named *.tar etc."""
    infos = infos.values() if isinstance(infos, dict) else infos
    return [_to_url(fs, i["name"], local) for i in infos if i.get("type") == "file" and _is_shard(i["name"])]


def _glob(pattern: str) -> list[str]:
    fs, path = filesystem(pattern)
    return _files(fs, fs.glob(path, detail=True), _is_local(pattern))


def _existing(urls: list[str]) -> list[str]:
    """The literal URLs that exist, with one listing per parent folder (not one request per shard)."""
    by_parent: dict[str, set[str]] = {}
    found = []
    for url in urls:
        local = _is_local(url)
        fs, path = filesystem(url)
        parent = posixpath.dirname(path.rstrip("/"))
        key = f"{url.split('://')[0] if not local else 'file'}|{parent}"
        if key not in by_parent:
            try:
                by_parent[key] = {p.rstrip("/") for p in fs.ls(parent, detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                by_parent[key] = set()
        if path.rstrip("/") in by_parent[key]:
            found.append(url)
    return found


def _read_list_file(url: str) -> list[str]:
    """One shard URL per line; blank lines and `#` comments ignored; relative entries are relative to the file;
    entries may use brace ranges (expanded, not checked: a missing one counts as a failed shard when read)."""
    fs, path = filesystem(url)
    with fs.open(path, "r") as f:
        lines = f.read().splitlines()
    local = _is_local(url)
    protocol, rest = url.split("://", 1) if not local else ("", os.path.abspath(path))
    out = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry and not os.path.isabs(entry):
            if local:
                entry = os.path.normpath(os.path.join(os.path.dirname(rest), entry))
            else:
                entry = f"{protocol}://" + posixpath.normpath(posixpath.join(posixpath.dirname(rest), entry))
        out.extend(expand_braces(entry))
    return out


def list_shards(source: str) -> list[str]:
    """Sorted, de-duplicated shard URLs from a folder (its *.tar), a glob, a brace range such as
    `s3://b/laion/{00000..00099}.tar` (members that do not exist are dropped with a warning), a single .tar,
    or a shard-list text file. Local paths come back absolute. Raises MTNError when nothing matches."""
    source = str(source).strip()
    if not source:
        raise MTNError("no shards: the shard source is empty")
    filesystem(source)[0].invalidate_cache()  # listings cached by this process's s3fs may predate new shards
    if _BRACE.search(source):
        urls = expand_braces(source)
        literal = [u for u in urls if not _GLOB.search(u)]
        found = [x for u in urls if _GLOB.search(u) for x in _glob(u)]
        if literal:
            present = _existing([os.path.abspath(u) if _is_local(u) and "://" not in u else u for u in literal])
            if len(present) < len(literal):
                log.warning("%d of the %d shards named by %s do not exist (skipped)", len(literal) - len(present),
                            len(literal), source)
            found += present
    elif _GLOB.search(source):
        found = _glob(source if "://" in source else os.path.abspath(os.path.expanduser(source)))
    else:
        url = source if "://" in source else os.path.abspath(os.path.expanduser(source))
        local = _is_local(url)
        fs, path = filesystem(url)
        try:
            is_dir = fs.isdir(path)
            is_file = not is_dir and fs.isfile(path)
        except OSError as e:
            raise MTNError(f"no shards: cannot read {source}: {e}") from None
        if is_dir:
            found = _files(fs, fs.ls(path, detail=True), local)
        elif is_file:
            found = [url] if _is_shard(path) else _read_list_file(url)
        else:
            raise MTNError(f"no shards: {source} does not exist (a folder, glob, {{00000..00099}} range or list file)")
    if not found:
        raise MTNError(f"no shards match {source} (expected .tar files)")
    return sorted(set(found))


# ----------------------------------------------------------------------------------------------- tar stream
class TruncatedShard(Exception):
    """The archive ended before its end-of-archive marker (cut mid-member, mid-header, or between members)."""


_ZERO = bytes(512)


def _read_exact(f, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for big sizes
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def iter_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, read sequentially (no seeks). GNU long names and pax
    paths are honoured. Raises TruncatedShard when the stream ends without the zero block that closes a tar,
    ValueError on a header whose checksum is wrong (not a tar, or corrupt)."""
    long_name = None
    offset = 0
    while True:
        hdr = _read_exact(f, 512)
        if len(hdr) < 512:
            raise TruncatedShard(f"ends at byte {offset + len(hdr)} without the end-of-archive marker")
        if hdr == _ZERO:
            return
        stored = _number(hdr[148:156])
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ValueError(f"bad tar header at byte {offset}")
        size, kind = _number(hdr[124:136]), hdr[156:157]
        data = _read_exact(f, size)
        pad = (-size) % 512
        if len(data) < size or len(_read_exact(f, pad)) < pad:
            raise TruncatedShard(f"cut inside a member at byte {offset + 512 + len(data)}")
        offset += 512 + size + pad
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax extended header: only `path` matters here
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers...
            long_name = None
            continue
        name = long_name or hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if not long_name and hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        long_name = None
        yield name, data


def iter_samples(f) -> Iterator[tuple[str, dict[str, bytes]]]:
    """webdataset samples: consecutive members sharing a key (`dir/key.ext`, ext lower-cased). On truncation the
    sample being read is dropped (it may be incomplete) and TruncatedShard propagates."""
    key, files = None, {}
    for name, data in iter_members(f):
        m = _MEMBER.match(name)
        if not m:
            continue
        k, ext = m.group(1), m.group(2).lower()
        if k != key:
            if key is not None:
                yield key, files
            key, files = k, {}
        files[ext] = data
    if key is not None:
        yield key, files


def open_shard(url: str, block_size: int):
    """A sequential binary file object for one shard (ranged GETs of `block_size` with read-ahead on S3)."""
    if _is_local(url):
        return open(url[len("file://"):] if url.startswith("file://") else url, "rb", buffering=1 << 20)  # noqa: SIM115
    fs, path = filesystem(url)
    return fs.open(path, "rb", block_size=block_size, cache_type="readahead")


# ----------------------------------------------------------------------------------------------- read-ahead
_DONE = ("done",)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardReader:
    """Reads `shards` in order on a background thread (S3 latency overlaps decoding) and yields events:
    ("sample", shard, index, key, files) for each sample whose in-shard index passes `keep`,
    ("truncated", shard, reason, n_read) and ("failed", shard, reason). At most `depth` samples wait in memory."""

    def __init__(self, shards: list[str], keep: Callable[[int], bool] | None = None, depth: int = 256,
                 block_size: int = 8 << 20, retries: int = 2):
        self.shards, self.keep, self.block_size, self.retries = list(shards), keep, block_size, retries
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()

    def __iter__(self):
        thread = threading.Thread(target=self._run, name="mtn-shard-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = self._q.get()
                if item is _DONE:
                    return
                yield item
        finally:
            self._stop.set()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _open(self, shard: str):
        for attempt in range(self.retries + 1):
            try:
                return open_shard(shard, self.block_size)
            except _PERMANENT:
                raise
            except Exception:
                if attempt == self.retries:
                    raise
                time.sleep(0.5 * 2**attempt)

    def _read(self, shard: str) -> bool:
        n = 0
        try:
            f = self._open(shard)
        except Exception as e:
            return self._put(("failed", shard, f"{type(e).__name__}: {e}"))
        try:
            with f:
                stream = gzip.GzipFile(fileobj=f) if shard.lower().endswith((".gz", ".tgz")) else f
                for index, (key, files) in enumerate(iter_samples(stream)):
                    n += 1
                    if (self.keep is None or self.keep(index)) and not self._put(("sample", shard, index, key, files)):
                        return False
        except TruncatedShard as e:
            return self._put(("truncated", shard, f"{e} (after {n} samples)"))
        except Exception as e:  # read errors, a corrupt header: unreadable if nothing came out, else truncated
            kind = "failed" if n == 0 else "truncated"
            return self._put((kind, shard, f"{type(e).__name__}: {e} (after {n} samples)"))
        return True

    def _run(self):
        try:
            for shard in self.shards:
                if self._stop.is_set() or not self._read(shard):
                    return
        finally:
            self._put(_DONE)
