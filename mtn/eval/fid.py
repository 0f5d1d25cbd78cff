"""Frechet Inception Distance, numerically as pytorch-fid computes it (``fid_score.py``).

Feature extractors (``build_feature_extractor``):

* ``"inception:/path/pt_inception-2015-12-05-6726825d.pth"``: pytorch-fid's FID Inception-v3 with its weights --
  the only setting whose values are comparable to published FIDs;
* ``"inception"``: the same network, randomly initialised (seeded): exercises the pipeline, values meaningless;
* ``"tiny"``: a small seeded conv net with 64-d features (``mtn.tiny.fid``), fast on CPU, for tests and smoke
  runs.

Reference sets are image folders, lists of PIL images, or pytorch-fid ``.npz`` stats files (keys ``mu``,
``sigma``), so stats of a large reference folder can be computed once with ``reference_stats`` + ``save_stats``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn
from tqdm import tqdm

from mtn.errors import MTNError
from mtn.eval.inception import FID_WEIGHTS_NAME, load_inception

log = logging.getLogger("mtn.eval")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EXTRACTOR_SPECS = ('"inception:/path/to/pt_inception-2015-12-05-6726825d.pth" (real FID)',
                   '"inception" (random weights, smoke only)', '"tiny" (small seeded conv net, smoke only)')

Images = Sequence[Image.Image] | torch.Tensor


def build_feature_extractor(spec: str, seed: int = 0) -> nn.Module:
    """An eval-mode feature extractor with attributes ``dim``, ``description`` and ``pretrained`` (see module doc)."""
    kind, _, arg = spec.partition(":")
    if kind == "tiny" and not arg:
        from mtn.tiny.fid import TinyFeatureNet  # offline stand-in, imported only when asked for

        model = TinyFeatureNet(seed)
        model.description = "tiny seeded conv net: smoke value only"
        model.pretrained = False
    elif kind == "inception":
        model = load_inception(arg or None, seed=seed)
        if model.pretrained:
            model.description = f"FID Inception-v3 (pytorch-fid weights {arg})"
        else:
            model.description = f"FID Inception-v3, RANDOM weights: smoke value only (real FID needs {FID_WEIGHTS_NAME})"
    else:
        raise MTNError(f"unknown FID feature extractor {spec!r}; use one of: {', '.join(EXTRACTOR_SPECS)}")
    model.eval()
    model.requires_grad_(False)
    return model


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    # /255 exactly as torchvision's ToTensor, which pytorch-fid uses
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def _check_tensor(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise MTNError(f"image tensor must be [N, 3, H, W], got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise MTNError(f"image tensor must be float in [0, 1], got {images.dtype} (divide uint8 images by 255)")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise MTNError(f"image tensor values must be in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    return images


def image_features(extractor: nn.Module, images: Images, batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Features [N, d] float64 of PIL images (any mode, converted to RGB) or a float tensor [N, 3, H, W] in [0, 1].

    PIL images are batched as they are when all share one size; mixed sizes are each resized (bilinear, the
    extractor's own resize) to the extractor's ``input_size`` so they can be stacked.
    """
    if batch_size < 1:
        raise MTNError(f"batch_size must be >= 1, got {batch_size}")
    is_tensor = isinstance(images, torch.Tensor)
    if is_tensor:
        _check_tensor(images)
    elif any(not isinstance(im, Image.Image) for im in images):
        raise MTNError("images must be a list of PIL images or a float tensor [N, 3, H, W]")
    n = len(images)
    if n == 0:
        raise MTNError("no images to embed")
    resize_to = None
    if not is_tensor and len({im.size for im in images}) > 1:
        resize_to = tuple(getattr(extractor, "input_size", images[0].size[::-1]))  # (H, W)
    param = next(extractor.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    chunks = []
    with torch.no_grad(), tqdm(total=n, unit="img", desc="FID features", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            if is_tensor:
                batch = images[start:start + batch_size].float()  # [B, 3, H, W]
            else:
                tensors = [_pil_to_tensor(im) for im in images[start:start + batch_size]]  # B x [3, H, W]
                if resize_to is not None:
                    tensors = [F.interpolate(t[None], size=resize_to, mode="bilinear", align_corners=False)[0]
                               for t in tensors]  # B x [3, *input_size]
                batch = torch.stack(tensors)  # [B, 3, H, W]
            feats = extractor(batch.to(device))  # [B, d]
            chunks.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
            bar.update(batch.shape[0])
    return np.concatenate(chunks, axis=0)  # [N, d]


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [d], sigma [d, d]) of features [N, d], N >= 2 (unbiased covariance, as pytorch-fid)."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise MTNError(f"features must be [N, d], got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise MTNError(f"FID needs at least 2 images per set (a covariance), got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)  # [d], [d, d]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)); pytorch-fid's ``calculate_frechet_distance``."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)  # [d]
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)  # [d, d]
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise MTNError(f"FID stats do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape} (were both sets embedded by the same feature extractor?)")
    diff = mu1 - mu2  # [d]
    with warnings.catch_warnings():
        # singular products are expected with few images; handled below like pytorch-fid (its disp=False)
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))  # [d, d], possibly complex
        if not np.isfinite(covmean).all():
            log.warning("fid calculation produces singular product; adding %s to diagonal of cov estimates", eps)
            offset = np.eye(sigma1.shape[0]) * eps  # [d, d]
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error can leave a slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MTNError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrt(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two feature sets [N1, d], [N2, d] (each N >= 2)."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write pytorch-fid's stats format: an .npz with ``mu`` [d] and ``sigma`` [d, d]."""
    path = Path(path)
    if path.suffix != ".npz":
        raise MTNError(f"FID stats path must end in .npz (numpy would append it silently), got {path}")
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise MTNError(f"FID stats need mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, mu=mu, sigma=sigma)


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a pytorch-fid style .npz (no pickles)."""
    path = Path(path)
    if not path.is_file():
        raise MTNError(f"FID stats file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise MTNError(f"{path} is not a FID stats file: missing {missing}, has {sorted(f.files)} "
                               "(expected keys 'mu' and 'sigma')")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except MTNError:
        raise
    except Exception as e:  # not a zip, pickled arrays, truncated
        raise MTNError(f"could not read FID stats {path}: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise MTNError(f"{path}: FID stats need mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    return mu, sigma


def load_image_folder(path: str | os.PathLike, limit: int | None = None) -> list[Image.Image]:
    """RGB images (png/jpg/jpeg/webp/bmp) directly in ``path``, sorted by file name; the first ``limit`` if given."""
    folder = Path(path)
    if not folder.is_dir():
        raise MTNError(f"image folder not found: {folder}")
    if limit is not None and limit < 1:
        raise MTNError(f"limit must be >= 1, got {limit}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise MTNError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    images = []
    for p in files[:limit]:
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))  # convert() loads the pixels, so the file can close
        except OSError as e:
            raise MTNError(f"could not read image {p}: {e}") from e
    return images


def reference_stats(reference: str | os.PathLike | Images, extractor: nn.Module, batch_size: int = 32,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a reference: a ``.npz`` stats file, an image folder, PIL images or an image tensor."""
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if path.suffix == ".npz":
            mu, sigma = load_stats(path)
            dim = getattr(extractor, "dim", None)
            if dim is not None and mu.shape[0] != dim:
                raise MTNError(f"{path} holds {mu.shape[0]}-d stats but the extractor gives {dim}-d features "
                               f"({getattr(extractor, 'description', type(extractor).__name__)})")
            return mu, sigma
        reference = load_image_folder(path)
    return feature_stats(image_features(extractor, reference, batch_size=batch_size, progress=progress))


def compute_fid(images: str | os.PathLike | Images, reference: str | os.PathLike | Images, extractor: nn.Module,
                batch_size: int = 32, progress: bool = False) -> float:
    """FID of ``images`` (PIL list, tensor or folder) against ``reference`` (folder, .npz stats, PIL list, tensor).

    Only an extractor with ``pretrained = True`` built from pytorch-fid's weights gives comparable FIDs.
    """
    mu1, sigma1 = reference_stats(images, extractor, batch_size=batch_size, progress=progress)
    mu2, sigma2 = reference_stats(reference, extractor, batch_size=batch_size, progress=progress)
    return frechet_distance(mu1, sigma1, mu2, sigma2)
