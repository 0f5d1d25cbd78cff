"""Diffusion training pieces, pure functions: the DDPM loss (epsilon or v) with min-SNR-gamma weights (diffusers'
`compute_snr`), noise offset, caption dropout, and an image grid of any count (diffusers' `make_image_grid`).
No I/O; jobs/finetune_unet.py wires them together (the EMA of weights is diffusers' `EMAModel`, mtn/finetune.py)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def loss_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights [B]: ones, or min-SNR-gamma (Hang et al. 2023) for the scheduler's epsilon / v
    target, with the SNR alpha_bar / (1 - alpha_bar) from diffusers' `compute_snr`."""
    if not snr_gamma:
        return torch.ones(timesteps.shape, device=timesteps.device)
    from diffusers.training_utils import compute_snr

    s = compute_snr(scheduler, timesteps)  # [B]
    clipped = torch.clamp(s, max=snr_gamma)
    # epsilon: min(snr, g) / snr; v-prediction: min(snr, g) / (snr + 1) (the v target already scales by snr + 1)
    return clipped / s if scheduler.config.prediction_type == "epsilon" else clipped / (s + 1)


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like latents [B, C, h, w]; noise_offset adds a per-channel constant (helps very dark/bright
    images, https://www.crosslabs.org/blog/diffusion-with-offset-noise)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=latents.device,
                                                   dtype=latents.dtype)  # [B, C, 1, 1] broadcast
    return noise


def diffusion_loss(unet_out: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   scheduler, snr_gamma: float | None = None) -> torch.Tensor:
    """MSE to the scheduler's target (epsilon, or v = a*noise - s*x0), weighted per sample, averaged."""
    pred_type = scheduler.config.prediction_type
    if pred_type == "epsilon":
        target = noise
    elif pred_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type {pred_type!r} is not trained here (epsilon | v_prediction)")
    per_sample = F.mse_loss(unet_out.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
    return (per_sample * loss_weights(scheduler, timesteps, snr_gamma)).mean()


def drop_captions(captions: list[str], p: float, rng: random.Random) -> list[str]:
    """Classifier-free guidance training: each caption becomes "" with probability p."""
    return ["" if rng.random() < p else c for c in captions]


def image_grid(images: list, cols: int):
    """PIL images of one size -> one grid, row-major; a last row that is not full is padded with white tiles
    (diffusers' `make_image_grid` wants exactly rows x cols images)."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    rows = (len(images) + cols - 1) // cols
    blank = Image.new("RGB", images[0].size, "white")
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
