"""Feature cache: frozen source/target encoder outputs stored once, so MTN training never re-runs the encoders.

A cache is a folder (local or any fsspec URL such as s3://bucket/prefix) written by jobs/extract_features.py:

    manifest.json                      written last: a folder without it is an incomplete extraction
    gen-<time>-<id>/shard-00000000.safetensors   rows in any order; each shard carries its rows' corpus `index`
    ...

Integrity. Each manifest entry carries the shard's sha256; loading refuses a shard whose bytes differ, naming it
and how to rebuild. A re-extraction writes a new generation folder beside the old cache and then replaces the
manifest (atomically: a rename locally, one PUT on S3), so until the new cache is complete the old one stays
valid; shards no manifest names any more are removed afterwards (prune_cache). Caches of format version 1
(shards at the top level, no checksums) still load, with a warning that corruption cannot be detected there.

Each shard holds `index` [n] int64, `source` [n, L, d_s] (L <= S_s: the shard's longest source; padded source
positions are zeros, the MTN ignores them), `source_mask` [n, L] uint8, `target` [n, S_t, d_t] (all S_t positions,
padding included, as the UNet attends to them; or, with cache_target_padding=false, zeros there and trimmed like
the source) and `target_mask` [n, S_t] uint8, in fp16 or bf16. Loading pads everything back to S_s / S_t.

The manifest records what the features depend on: each encoder's id, the hub revision the config pinned
(`hub_revision`: branch, tag or commit; null = main), revision (content hash of its local files, or the commit of
the cached hub snapshot), max_length, prefix; the corpus files and a checksum of the exact pairs. `check_cache` refuses a cache whose
record differs from what a config asks for, naming the field, so a stale cache is never used silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import fsspec
import torch

from mtn.errors import MTNError

FORMAT = "mtn-feature-cache"
VERSION = 2  # 2: per-shard sha256, shards in generation folders; 1 (no checksums) still loads
MANIFEST = "manifest.json"
REBUILD = ("rebuild it with `python jobs/extract_features.py --config <the same config>` (a cache whose shards "
           "fail their checksums is re-extracted)")
ENCODER_KEYS = ("name_or_path", "subfolder", "hub_revision", "revision", "max_length", "prefix")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
_REVISIONS: dict = {}  # (path, subfolder, hub revision) -> revision; hashing a 500 MB encoder once per process is enough
log = logging.getLogger("mtn.data")


# ----------------------------------------------------------------------------------------------- fingerprints
def encoder_revision(name_or_path: str, subfolder: str | None = None, hub_revision: str | None = None) -> str:
    """A content hash of a local encoder's weights/config/tokenizer files; builtin for tiny:, else the commit of the
    hub snapshot (of `hub_revision`, default main) when it is in the local HF cache ('unresolved' otherwise)."""
    if name_or_path.startswith("tiny:"):
        return "builtin-seed0"
    key = (name_or_path, subfolder, hub_revision)
    if key in _REVISIONS:
        return _REVISIONS[key]
    root = Path(name_or_path).expanduser()
    if root.is_dir():
        base = root / subfolder if subfolder else root
        h = hashlib.sha256()
        for f in sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
            h.update(str(f.relative_to(base)).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        rev = "sha256:" + h.hexdigest()[:16]
    else:
        try:
            from huggingface_hub import snapshot_download

            rev = "hub:" + Path(snapshot_download(name_or_path, revision=hub_revision, local_files_only=True)).name
        except Exception:  # noqa: BLE001 - offline / not cached: say so in the manifest rather than guess
            rev = "unresolved"
    _REVISIONS[key] = rev
    return rev


def encoder_record(name_or_path: str, subfolder: str | None, max_length: int, prefix: str,
                   hub_revision: str | None = None) -> dict:
    return {"name_or_path": name_or_path, "subfolder": subfolder, "hub_revision": hub_revision or None,
            "revision": encoder_revision(name_or_path, subfolder, hub_revision or None),
            "max_length": max_length, "prefix": prefix or ""}


def corpus_record(pairs: list[tuple[str, str]], files: list[str]) -> dict:
    h = hashlib.sha256()
    for s, t in pairs:
        h.update(s.encode())
        h.update(b"\x00")
        h.update(t.encode())
        h.update(b"\x01")
    return {"files": files, "num_pairs": len(pairs), "sha256": h.hexdigest()[:32]}


def expected_record(cfg, pairs: list[tuple[str, str]], files: list[str]) -> dict:
    """What a cache of `pairs` must record to be used with TrainConfig `cfg`."""
    return {"source_encoder": encoder_record(cfg.source_encoder, cfg.source_subfolder, cfg.source_max_length,
                                             cfg.source_prefix, cfg.source_revision),
            "target_encoder": encoder_record(cfg.target_encoder, cfg.target_subfolder, cfg.target_max_length,
                                             cfg.target_prefix, cfg.target_revision),
            "corpus": corpus_record(pairs, files)}


# ----------------------------------------------------------------------------------------------- writing
def _fs(url: str):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def new_generation() -> str:
    """A fresh folder name for one extraction's shards (sorts by time; unique across concurrent writers)."""
    return f"gen-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def write_shard(url: str, rows: dict[str, torch.Tensor], dtype: torch.dtype, trim_target: bool = False,
                generation: str | None = None) -> dict:
    """Write one shard (rows as produced by the encoders) into `url/generation/` and return its manifest entry
    (file relative to `url`, rows, sha256). Zero-padded sides are trimmed to the shard's longest row (later
    positions are all zeros and come back as zeros on load)."""
    from safetensors.torch import save

    index = rows["index"].long()  # [n]
    n_src = int(rows["source_mask"].sum(1).max())
    n_tgt = int(rows["target_mask"].sum(1).max()) if trim_target else rows["target"].shape[1]
    tensors = {
        "index": index.contiguous(),
        "source": rows["source"][:, :n_src].to(dtype).contiguous(),  # [n, L, d_s]
        "source_mask": rows["source_mask"][:, :n_src].to(torch.uint8).contiguous(),  # [n, L]
        "target": rows["target"][:, :n_tgt].to(dtype).contiguous(),  # [n, L_t, d_t]
        "target_mask": rows["target_mask"][:, :n_tgt].to(torch.uint8).contiguous(),  # [n, L_t]
    }
    # corpus indices are unique, so names never collide within a generation
    name = f"{generation or new_generation()}/shard-{int(index.min()):08d}.safetensors"
    data = save(tensors)
    fs, root = _fs(url)
    fs.makedirs(f"{root}/{name.rsplit('/', 1)[0]}", exist_ok=True)
    with fs.open(f"{root}/{name}", "wb") as f:
        f.write(data)
    return {"file": name, "rows": len(index), "sha256": hashlib.sha256(data).hexdigest()}


def _write_atomic(fs, path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one: a rename on local disk; on S3 a PUT of one
    small object already is all-or-nothing."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "w") as f:
            f.write(text)


def write_feature_manifest(url: str, record: dict, shards: list[dict], dims: dict, dtype: str, extra: dict | None = None):
    """Write the manifest last: this is the moment the cache (or its new generation) becomes the valid one."""
    fs, root = _fs(url)
    manifest = {"format": FORMAT, "version": VERSION, **record, "dtype": dtype, **dims,
                "num_rows": sum(s["rows"] for s in shards), "shards": sorted(shards, key=lambda s: s["file"]),
                **(extra or {})}
    fs.makedirs(root, exist_ok=True)
    _write_atomic(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2))
    return manifest


def _ours(name: str) -> bool:
    """Names this module writes (shards of format 1 at the top level, generation folders, manifest temps)."""
    return (name.startswith("gen-") or (name.startswith("shard-") and name.endswith(".safetensors"))
            or name.startswith(f"{MANIFEST}.tmp-"))


def prune_cache(url: str, manifest: dict) -> list[str]:
    """Remove the shards and generation folders `manifest` does not name (an older cache, an interrupted
    extraction). Other files in the folder are left alone. Returns what was removed (names)."""
    fs, root = _fs(url)
    keep = {s["file"].split("/", 1)[0] for s in manifest["shards"]}
    fs.invalidate_cache(root)  # an S3 listing cached before the writers ran would miss or resurrect entries
    removed = []
    for p in fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if _ours(name) and name not in keep:
            fs.rm(p, recursive=True)
            removed.append(name)
    return removed


def discard_generation(url: str, generation: str) -> None:
    """Best effort: remove an abandoned generation folder (prune_cache catches what this misses)."""
    fs, root = _fs(url)
    try:
        if fs.exists(f"{root}/{generation}"):
            fs.rm(f"{root}/{generation}", recursive=True)
    except OSError as e:
        log.warning("could not remove the abandoned %s/%s: %s", url, generation, e)


# ----------------------------------------------------------------------------------------------- reading
def read_feature_manifest(url: str) -> dict:
    fs, root = _fs(url)
    if not fs.exists(f"{root}/{MANIFEST}"):
        what = "an incomplete extraction (no manifest.json)" if fs.exists(root) else "not found"
        raise MTNError(f"feature cache {url}: {what}; run jobs/extract_features.py with the same config")
    try:
        manifest = json.loads(fs.cat(f"{root}/{MANIFEST}"))
    except ValueError as e:
        raise MTNError(f"feature cache {url}: manifest.json is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
        raise MTNError(f"feature cache {url}: unknown format {manifest.get('format')!r} "
                       f"version {manifest.get('version')!r} (expected {FORMAT!r} <= {VERSION})")
    return manifest


def check_cache(url: str, expected: dict, needs_target_padding: bool = False) -> dict:
    """The manifest, if it was extracted with exactly the encoders, lengths, prefixes and corpus expected
    (and holds real target features at padded positions when the loss scores them)."""
    manifest = read_feature_manifest(url)
    problems = []
    if needs_target_padding and manifest.get("target_zero_padded"):
        problems.append("target padding: the cache zero-padded the target (cache_target_padding=false) but "
                        "mse_on_mask=false trains on every target position")
    for side in ("source_encoder", "target_encoder"):
        for key in ENCODER_KEYS:
            have, want = manifest.get(side, {}).get(key), expected[side].get(key)
            if have != want:
                problems.append(f"{side}.{key}: cache has {have!r}, config wants {want!r}")
    for key in ("num_pairs", "sha256"):
        have, want = manifest.get("corpus", {}).get(key), expected["corpus"][key]
        if have != want:
            problems.append(f"corpus.{key}: cache has {have!r}, config's corpus gives {want!r}"
                            + (f" (files {expected['corpus']['files']})" if key == "sha256" else ""))
    if problems:
        raise MTNError(f"feature cache {url} does not match this config (stale or other run); re-extract with "
                       f"jobs/extract_features.py, or point to the right cache:\n  " + "\n  ".join(problems))
    return manifest


def _shard_bytes(url: str, fs, root: str, shard: dict) -> bytes:
    """A shard's bytes, checked against the manifest's sha256 (format 1 entries have none)."""
    try:
        data = fs.cat(f"{root}/{shard['file']}")
    except FileNotFoundError:
        raise MTNError(f"feature cache {url}: shard {shard['file']} listed in the manifest is missing; "
                       f"{REBUILD}") from None
    want = shard.get("sha256")
    if want is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise MTNError(f"feature cache {url}: shard {shard['file']} is corrupted (sha256 {got[:16]}..., the "
                           f"manifest says {want[:16]}...); {REBUILD}")
    return data


def _warn_unchecked(url: str, manifest: dict) -> None:
    unchecked = sum("sha256" not in s for s in manifest["shards"])
    if unchecked:
        log.warning("feature cache %s: %d of %d shards have no checksum (format version %s): corruption cannot be "
                    "detected; re-extract with `jobs/extract_features.py --force` to add checksums", url, unchecked,
                    len(manifest["shards"]), manifest.get("version"))


def verify_shards(url: str, manifest: dict | None = None) -> dict:
    """Read every shard and check it against its manifest checksum; raises MTNError naming the first bad one."""
    manifest = manifest or read_feature_manifest(url)
    fs, root = _fs(url)
    _warn_unchecked(url, manifest)
    for shard in manifest["shards"]:
        _shard_bytes(url, fs, root, shard)
    return manifest


def load_features(url: str, manifest: dict | None = None, rows: int | None = None) -> dict[str, torch.Tensor]:
    """All rows in corpus order: source [N, S_s, d_s] (zero padded back to S_s), masks, target [N, S_t, d_t].
    Every shard is checked against its manifest checksum first."""
    from safetensors.torch import load

    manifest = manifest or read_feature_manifest(url)
    fs, root = _fs(url)
    _warn_unchecked(url, manifest)
    parts = []
    for shard in manifest["shards"]:
        data = _shard_bytes(url, fs, root, shard)
        try:
            t = load(data)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file (format 1: no checksum caught it)
            raise MTNError(f"feature cache {url}: shard {shard['file']} is unreadable: {e}; {REBUILD}") from None
        if len(t["index"]) != shard["rows"]:
            raise MTNError(f"feature cache {url}: shard {shard['file']} has {len(t['index'])} rows, "
                           f"manifest says {shard['rows']}; {REBUILD}")
        for side in ("source", "target"):
            pad = manifest[f"{side}_len"] - t[side].shape[1]
            t[side] = torch.nn.functional.pad(t[side], (0, 0, 0, pad))  # [n, S, d]
            t[f"{side}_mask"] = torch.nn.functional.pad(t[f"{side}_mask"], (0, pad))  # [n, S]
        parts.append(t)
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = out.pop("index").argsort()  # corpus order, whatever order the workers wrote shards in
    n = len(order) if rows is None else min(rows, len(order))
    return {k: v[order[:n]] for k, v in out.items()}


@torch.no_grad()
def encode_rows(source, target, pairs: list[tuple[str, str]], full_target: bool = False,
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Encode pairs directly into cache-shaped rows (what a cache would hold, without writing one).
    full_target=False zero-pads the target too: exact for metrics and masked losses, which read real tokens only."""
    out: dict[str, list] = {"source": [], "source_mask": [], "target": [], "target_mask": []}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        src, src_m = source([s for s, _ in chunk], zero_pad=True)  # [b, S_s, d_s], [b, S_s]
        tgt, tgt_m = target([t for _, t in chunk], zero_pad=not full_target)  # [b, S_t, d_t], [b, S_t]
        for k, v in zip(out, (src, src_m, tgt, tgt_m), strict=True):
            out[k].append(v.cpu())
    return {k: torch.cat(v) for k, v in out.items()}
