"""A small seeded conv net as FID feature extractor (``fid_features: tiny``): fast on CPU, not perceptual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyFeatureNet(nn.Module):
    """A small seeded conv net: [N, 3, H, W] in [0, 1] (any size) -> [N, 64]. Not a perceptual metric."""

    dim = 64
    input_size = (64, 64)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's global RNG
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(32, self.dim, 3, stride=2, padding=1), nn.GELU(),
                nn.AdaptiveAvgPool2d(1),
            )
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    # He init: PyTorch's default shrinks activations per layer, leaving features that barely vary
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # [C_out, C_in, 3, 3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a fixed working size makes features independent of the input resolution, like Inception's 299x299
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)  # [N, 3, 64, 64]
        return torch.flatten(self.net(2 * x - 1), 1)  # [N, 64]
