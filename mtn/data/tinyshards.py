"""write_tiny_shards: a deterministic toy LAION-like dataset in img2dataset's webdataset layout (local or s3://)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

from mtn.data.imageproc import encode_image, paint_image
from mtn.data.shardio import filesystem
from mtn.errors import MTNError


def _spread(n: int, total: int, shift: int, taken: set[int]) -> set[int]:
    out: set[int] = set()
    for j in range(n):
        i = ((j * total) // n + total // (2 * n) + shift) % total
        while i in taken or i in out:
            i = (i + 1) % total
        out.add(i)
    return out


def write_tiny_shards(out_dir: str | Path, num_shards: int = 4, per_shard: int = 16, size: int = 64, seed: int = 0,
                      corrupt: int = 0, missing_caption: int = 0, formats: tuple = ("jpg", "png"),
                      noise: float = 0.0) -> list[str]:
    """A toy LAION-like dataset in img2dataset's layout (`00000.tar` with `{key}.{jpg|png}`, `.txt`, `.json`):
    painted shapes (shorter side `size`, aspect up to 3:2 either way) and template captions. `corrupt` images are
    garbage bytes or valid headers cut short, `missing_caption` samples have no .txt; both spread over the
    shards. Deterministic in `seed`; `out_dir` may be local or s3://. Returns the shard URLs."""
    from mtn.tiny import generate_captions

    total = num_shards * per_shard
    if num_shards < 1 or per_shard < 1 or size < 8:
        raise MTNError("write_tiny_shards needs num_shards >= 1, per_shard >= 1, size >= 8")
    if corrupt + missing_caption > total:
        raise MTNError(f"corrupt + missing_caption ({corrupt + missing_caption}) > samples ({total})")
    bad = _spread(corrupt, total, 0, set()) if corrupt else set()
    no_caption = _spread(missing_caption, total, 1, bad) if missing_caption else set()
    captions = generate_captions(total, seed)
    rng = random.Random(f"mtn-tiny-shards:{seed}")
    out = str(out_dir)
    if "://" not in out:
        out = str(Path(out).expanduser().resolve())
        Path(out).mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(per_shard - 1)))
    urls = []
    for s in range(num_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                g, key = s * per_shard + i, f"{s:05d}{i:0{width}d}"
                long = size + rng.randrange(size // 2 + 1)
                w, h = (long, size) if rng.random() < 0.5 else (size, long)
                fmt = formats[g % len(formats)]
                data = encode_image(paint_image(rng, w, h, noise), fmt)
                if g in bad:  # half garbage (no image header), half a real header with the pixels cut off
                    data = rng.randbytes(200) if len(bad) < 2 or g % 2 else data[: len(data) // 2]
                meta = {"key": key, "caption": None if g in no_caption else captions[g], "status": "success",
                        "url": f"https://example.invalid/{key}.{fmt}", "width": w, "height": h,
                        "original_width": w, "original_height": h, "similarity": round(rng.uniform(0.28, 0.4), 4),
                        "sha256": hashlib.sha256(data).hexdigest()}
                members = [(f"{key}.{fmt}", data)]
                if g not in no_caption:
                    members.append((f"{key}.txt", captions[g].encode()))
                members.append((f"{key}.json", json.dumps(meta).encode()))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        url = f"{out.rstrip('/')}/{s:05d}.tar"
        fs, path = filesystem(url)
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())
        urls.append(url)
    return urls
