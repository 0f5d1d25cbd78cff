"""Diffusion training pieces, pure functions: the DDPM loss (epsilon or v), min-SNR-gamma weights, noise offset,
caption dropout, EMA of weights, and an image grid. No I/O; jobs/finetune_unet.py wires them together."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep -> [B]."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()  # [B]
    return a / (1 - a)


def loss_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str,
                 snr_gamma: float | None) -> torch.Tensor:
    """Per-sample loss weights [B]: ones, or min-SNR-gamma (Hang et al. 2023) for epsilon / v targets."""
    if not snr_gamma:
        return torch.ones(timesteps.shape, device=timesteps.device)
    s = snr(alphas_cumprod, timesteps)  # [B]
    clipped = torch.clamp(s, max=snr_gamma)
    # epsilon: min(snr, g) / snr; v-prediction: min(snr, g) / (snr + 1) (the v target already scales by snr + 1)
    return clipped / s if prediction_type == "epsilon" else clipped / (s + 1)


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
    return (per_sample * loss_weights(scheduler.alphas_cumprod, timesteps, pred_type, snr_gamma)).mean()


def drop_captions(captions: list[str], p: float, rng: random.Random) -> list[str]:
    """Classifier-free guidance training: each caption becomes "" with probability p."""
    return ["" if rng.random() < p else c for c in captions]


class EMA:
    """Exponential moving average of parameters (fp32 shadow copies, on the parameters' device).

    decay at update k = min(decay, (1 + k) / (10 + k)): early updates follow the weights closely instead of
    averaging in the random initialisation for thousands of steps (diffusers' EMAModel warmup, power 1)."""

    def __init__(self, parameters, decay: float = 0.9999):
        self.params = [p for p in parameters if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params, strict=True):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)  # s = d*s + (1-d)*p
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        targets = [p for p in parameters if p.requires_grad]
        for s, p in zip(self.shadow, targets, strict=True):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {str(i): s.cpu() for i, s in enumerate(self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the model {len(self.shadow)}")
        self.decay, self.updates = state["decay"], state["updates"]
        for i, s in enumerate(self.shadow):
            s.copy_(state["shadow"][str(i)])


def image_grid(images: list, cols: int | None = None):
    """PIL images of one size -> one PIL grid image, row-major."""
    from PIL import Image

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
