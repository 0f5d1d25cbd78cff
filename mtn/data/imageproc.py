"""Image helpers for mtn.data.shards: decode (with JPEG DCT-domain downscaling), the SD training transform
(resize shorter side -> crop -> flip -> [-1, 1])."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header only (no pixel decode). Raises on bytes that are no image."""
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode_image(data: bytes, min_side: int = 0) -> Image.Image:
    """Fully decoded RGB image. With `min_side` > 0, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps its shorter side >= min_side: much faster on large photos (BENCHMARKS.md, "Streaming shards"), and an
    antialiased downscale anyway.
    Raises PIL's errors (OSError, ValueError, SyntaxError, ...) on corrupt or truncated bytes (PIL's
    LOAD_TRUNCATED_IMAGES is left False)."""
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        w, h = img.size
        scale = min_side / max(1, min(w, h))
        if scale < 1:  # PIL picks the largest 1/s with w // s >= requested (floors: ceil would miss 763 px -> 382)
            img.draft("RGB", (max(1, math.floor(w * scale + 1e-6)), max(1, math.floor(h * scale + 1e-6))))
    img.load()
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels become white (not the arbitrary colour a plain convert would keep)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Shorter side -> resolution, longer side scaled and truncated (torchvision Resize(int) semantics)."""
    if width <= height:
        return resolution, max(resolution, int(resolution * height / width))
    return max(resolution, int(resolution * width / height)), resolution


def crop_box(width: int, height: int, resolution: int, center: bool, rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the resolution x resolution crop: centred (torchvision CenterCrop rounding) or random."""
    if center or rng is None:
        return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    return rng.randint(0, height - resolution), rng.randint(0, width - resolution)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image [H, W] -> float32 tensor [3, H, W] in [-1, 1]."""
    arr = np.array(img, dtype=np.uint8)  # [H, W, 3], a writable copy
    chw = torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, H, W] uint8
    return chw.to(torch.float32).div_(127.5).sub_(1.0)  # [3, H, W] in [-1, 1]


def train_transform(img: Image.Image, resolution: int, center_crop: bool = True, random_flip: bool = False,
                    rng: random.Random | None = None) -> torch.Tensor:
    """The SD finetuning transform: resize (bicubic; PIL antialiases when shrinking) so the shorter side is
    `resolution`, crop a square (centre, or random from `rng`), flip left-right with p=0.5 when asked, normalize.
    Returns float32 [3, resolution, resolution] in [-1, 1]."""
    w, h = img.size
    new_w, new_h = resized_size(w, h, resolution)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = crop_box(new_w, new_h, resolution, center_crop, rng)
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng is not None and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)
