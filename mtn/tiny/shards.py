"""Toy LAION-like webdataset shards in img2dataset's layout (local or s3://): painted images, template captions,
and on request corrupt images and missing captions, to exercise mtn.data.shards offline."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from mtn.data.shardio import filesystem
from mtn.errors import MTNError
from mtn.tiny.captions import generate_captions


def paint_image(rng: random.Random, width: int, height: int, noise: float = 0.0) -> Image.Image:
    """A random-ish picture: a two-colour gradient background with 1-3 filled shapes; `noise` > 0 adds grain
    (sigma in grey levels) so JPEGs get photo-like sizes (benchmarks)."""

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    ramp = Image.linear_gradient("L").rotate(rng.choice([0, 90, 180, 270])).resize((width, height))  # 256x256 -> WxH
    img = ImageOps.colorize(ramp, colour(), colour()).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(width // 8, width // 2), y0 + rng.randint(height // 8, height // 2)
        kind = rng.choice(["ellipse", "rectangle", "triangle"])
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour())
        elif kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour())
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour())
    if noise > 0:
        grain = Image.effect_noise((width, height), noise).convert("RGB")  # mean 128
        img = Image.blend(img, grain, 0.25)
    return img


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=90)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


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
