"""The FID flavour of Inception-v3 (pytorch-fid's ``fid_inception_v3``), written without torchvision.

pytorch-fid builds torchvision's ``Inception3(num_classes=1008, aux_logits=False)`` and swaps in four patched
blocks that reproduce the TensorFlow graph the original FID was defined with:

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the 3x3 average pool of the pool branch excludes
  the zero padding (``count_include_pad=False``), as TensorFlow's pool does;
* ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch uses a 3x3 *max* pool (a quirk of that TF graph).

Module names here mirror torchvision's, so the state dict has exactly the keys of pytorch-fid's weights file
``pt_inception-2015-12-05-6726825d.pth`` (``Conv2d_1a_3x3.conv.weight``, ``Mixed_7c.branch_pool.bn.running_var``,
``fc.weight`` [1008, 2048], ...) and ``load_state_dict(strict=True)`` of that file works.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtn.errors import MTNError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the TF graph's classifier has 1008 outputs (1000 ImageNet classes + 8 unused)


class BasicConv2d(nn.Module):
    """conv (no bias: BN follows) + BatchNorm(eps=1e-3, TF's value) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores padded zeros, torchvision's default counts them: the FID patch
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)  # [N, C, H, W]


class FIDInceptionA(nn.Module):
    """torchvision InceptionA with the TF average pool (Mixed_5b/5c/5d)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # [N, 64, H, W]
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # [N, 64, H, W]
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # [N, 96, H, W]
        bp = self.branch_pool(_tf_avg_pool(x))  # [N, pool_features, H, W]
        return torch.cat([b1, b5, b3, bp], 1)  # [N, 224 + pool_features, H, W]


class InceptionB(nn.Module):
    """torchvision InceptionB, unpatched (Mixed_6a: 35x35 -> 17x17)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)  # [N, 384, H', W']
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # [N, 96, H', W']
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, C_in, H', W']
        return torch.cat([b3, bd, bp], 1)  # [N, 480 + C_in, H', W']


class FIDInceptionC(nn.Module):
    """torchvision InceptionC (factorised 7x7) with the TF average pool (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # [N, 192, 17, 17]
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # [N, 192, 17, 17]
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)  # [N, c7 or 192, 17, 17]
        bp = self.branch_pool(_tf_avg_pool(x))  # [N, 192, 17, 17]
        return torch.cat([b1, b7, bd, bp], 1)  # [N, 768, 17, 17]


class InceptionD(nn.Module):
    """torchvision InceptionD, unpatched (Mixed_7a: 17x17 -> 8x8)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))  # [N, 320, 8, 8]
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))  # [N, 192, 8, 8]
        bp = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 768, 8, 8]
        return torch.cat([b3, b7, bp], 1)  # [N, 1280, 8, 8]


class FIDInceptionE(nn.Module):
    """torchvision InceptionE; ``pool="avg"`` is FIDInceptionE_1 (Mixed_7b), ``pool="max"`` FIDInceptionE_2 (7c)."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)  # [N, 320, 8, 8]
        b3 = self.branch3x3_1(x)  # [N, 384, 8, 8]
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # [N, 768, 8, 8]
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))  # [N, 384, 8, 8]
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # [N, 768, 8, 8]
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)  # [N, C_in, 8, 8]
        else:
            # pytorch-fid: the FID graph max-pools here, likely a bug in that TF model, kept for comparability
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)  # [N, C_in, 8, 8]
        bp = self.branch_pool(pooled)  # [N, 192, 8, 8]
        return torch.cat([b1, b3, bd, bp], 1)  # [N, 2048, 8, 8]


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3; ``forward`` returns the 2048-d pool3 features used by FID.

    Input: float images in [0, 1], [N, 3, H, W] of any size (resized to 299x299 here, as pytorch-fid does).
    ``fc`` (1008 classes) is never used by ``forward``; it exists so the weights file loads strictly.
    """

    dim = FEATURE_DIM
    input_size = (INPUT_SIZE, INPUT_SIZE)

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = False
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise MTNError(f"FID Inception expects images [N, 3, H, W], got shape {list(x.shape)}")
        # pytorch-fid always resizes (a no-op at 299x299) with plain bilinear, no antialiasing
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)  # [N, 3, 299, 299]
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF weights were trained on
        for stem in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1):
            x = stem(x)  # -> [N, 64, 73, 73]
        for stem in (self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2):
            x = stem(x)  # -> [N, 192, 35, 35]
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # -> [N, 768, 17, 17]
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # [N, 768, 17, 17]
        for block in (self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # -> [N, 2048, 8, 8]
        return torch.flatten(self.avgpool(x), 1)  # [N, 2048]


def _random_init(model: FIDInceptionV3, seed: int) -> None:
    # He init keeps activations O(1) through 94 conv+BN(identity stats)+ReLU layers; PyTorch's default init
    # shrinks them layer by layer, giving near-zero features whose covariance is numerically degenerate.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)  # [C_out, C_in, kh, kw]
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.01, generator=gen)  # [1008, 2048]
                m.bias.zero_()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pth", ".pt"):
            # weights_only: a weights file must never get to run pickled code
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise MTNError(
                f"FID Inception weights must be a .pth/.pt or .safetensors file, got {path} "
                f"(expected pytorch-fid's {FID_WEIGHTS_NAME})"
            )
    except MTNError:
        raise
    except Exception as e:  # unpickling refusals, truncated files, bad safetensors headers
        raise MTNError(f"could not read FID Inception weights {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MTNError(
            f"{path} is not a plain state dict of tensors (expected pytorch-fid's {FID_WEIGHTS_NAME}, "
            f"downloadable from {FID_WEIGHTS_URL})"
        )
    return state


def load_inception(weights: str | os.PathLike | None, seed: int = 0) -> FIDInceptionV3:
    """The FID Inception in eval mode, gradients off.

    ``weights``: path to pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or the same tensors as
    ``.safetensors``); ``None`` gives a random init seeded by ``seed`` with ``pretrained = False`` -- FID values
    from it are smoke-test numbers only, not comparable to any published FID.
    """
    model = FIDInceptionV3()
    if weights is None:
        _random_init(model, seed)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MTNError(
                f"FID Inception weights not found: {path} (expected pytorch-fid's {FID_WEIGHTS_NAME}, "
                f"downloadable from {FID_WEIGHTS_URL})"
            )
        state = _read_state_dict(path)
        try:
            # strict=False only to word the report ourselves; any missing/unexpected key is still an error.
            # BatchNorm fills in num_batches_tracked when a (pre-torch-0.4.1 style) file lacks it.
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise MTNError(f"FID Inception weights {path} do not fit the model ({e}); expected {FID_WEIGHTS_NAME}") from e
        if result.missing_keys or result.unexpected_keys:
            parts = []
            for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
                if keys:
                    more = f" ... ({len(keys)} in total)" if len(keys) > 5 else ""
                    parts.append(f"{label} keys {', '.join(keys[:5])}{more}")
            raise MTNError(
                f"FID Inception weights {path} do not match the model: {'; '.join(parts)}. Expected pytorch-fid's "
                f"{FID_WEIGHTS_NAME} (torchvision's inception_v3_google is a different network)"
            )
        model.pretrained = True
    model.eval()
    model.requires_grad_(False)
    return model
