"""Model Translation Network (GlueGen, Qin et al. 2023, Sec. 4.2 / Eq. 6): an MLP-mixer autoencoder.

Encoder M maps source-LM hidden states [B, S_s, d_s] into the target encoder's space [B, S_t, d_t];
decoder N maps them back (used only by the reconstruction / closed-loop losses during training).

Parameter count at the paper's dims (T5-3B d=1024 -> LDM-BERT d=1280, 77 -> 77 tokens), encoder only:
    mtn-3rm: 34.3M   (paper: 34M)        mtn-5rm: 51.2M   (paper: 51M)
Each residual module holds two (sequence-mixing, token-mixing) MLP pairs with hidden ratio 2, as in the
released GlueGen translator; the output module has the same shape and its last token-mixing MLP maps
d_h -> d_t. The paper's counts are matched when "K residual modules" means K body modules plus that
output module (the paper's text does not say how the output map is counted). The S_s -> S_t sequence
projection (S_s*S_t weights) and the d_s -> d_h input projection (absent when d_h == d_s, the default)
are our additions for encoders whose length/width differ from the target; they add < 0.1M at 77 -> 77.
`tests/test_model.py::test_param_counts_at_paper_dims` prints the counts.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from mtn.errors import MTNError

NAMED_SIZES = {"mtn-3rm": {"num_modules": 3}, "mtn-5rm": {"num_modules": 5}}


class MixerMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear over the last dim, residual when in_dim == out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.drop = nn.Dropout(dropout)
        self.residual = in_dim == out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.drop(nn.functional.gelu(self.fc1(self.norm(x)))))
        return x + y if self.residual else y


class ResidualModule(nn.Module):
    """Two rounds of (sequence-mixing, token-mixing) MLPs on [B, S, d]; the last one may change d."""

    def __init__(self, seq_len: int, dim: int, out_dim: int, mult: int = 2, dropout: float = 0.0):
        super().__init__()
        # sequence-mixing: shared over channels, mixes the S positions of each channel
        self.seq1 = MixerMLP(seq_len, seq_len, seq_len * mult, dropout)
        self.seq2 = MixerMLP(seq_len, seq_len, seq_len * mult, dropout)
        # token-mixing: shared over tokens, mixes the d channels of each token
        self.tok1 = MixerMLP(dim, dim, dim * mult, dropout)
        self.tok2 = MixerMLP(dim, out_dim, dim * mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, d]
        x = self.seq1(x.transpose(1, 2)).transpose(1, 2)  # [B, S, d]
        x = self.tok1(x)  # [B, S, d]
        x = self.seq2(x.transpose(1, 2)).transpose(1, 2)  # [B, S, d]
        return self.tok2(x)  # [B, S, d_out]


class MixerTranslator(nn.Module):
    """[B, S_in, d_in] (+ mask) -> [B, S_out, d_out]: input proj, sequence proj, K modules, output module."""

    def __init__(self, in_dim, in_len, out_dim, out_len, num_modules, hidden_dim=None, mult=2, dropout=0.0):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.in_proj = nn.Identity() if hidden_dim == in_dim else nn.Linear(in_dim, hidden_dim)
        # positions are mixed by a learned S_in x S_out map, initialised to copy position i -> i so that
        # BOS/first tokens line up with the target's from the first step
        self.seq_proj = nn.Linear(in_len, out_len)
        with torch.no_grad():
            self.seq_proj.weight.copy_(torch.eye(out_len, in_len))
            self.seq_proj.bias.zero_()
        self.blocks = nn.ModuleList(
            [ResidualModule(out_len, hidden_dim, hidden_dim, mult, dropout) for _ in range(num_modules)]
        )
        self.out = ResidualModule(out_len, hidden_dim, out_dim, mult, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(x)  # [B, S_in, d_h]
        if mask is not None:
            # zero padded positions so their content can never reach the output (mask invariance)
            x = x * mask.to(x.dtype).unsqueeze(-1)  # [B, S_in, d_h]
        x = self.seq_proj(x.transpose(1, 2)).transpose(1, 2)  # [B, S_out, d_h]
        for block in self.blocks:
            x = block(x)  # [B, S_out, d_h]
        return self.out(x)  # [B, S_out, d_out]


class ModelTranslationNetwork(ModelMixin, ConfigMixin):
    """MTN: `encode` (M, source -> target space) and `decode` (N, target -> source space).

    Args:
        source_dim / source_len: hidden size and (padded) token count of the source LM, d_s and S_s.
        target_dim / target_len: the same for the target encoder the diffusion model was trained with.
        num_modules: residual modules K in each of M and N (3 or 5 in the paper, see NAMED_SIZES).
        hidden_dim: width of M's body (default d_s); N's body uses `decoder_hidden_dim` (default d_t).
        with_decoder: False drops N (inference checkpoints can be smaller; training needs it for L_rec).
        target_stats: M's output is `shift + scale * body` with per-position target statistics (buffers
            `target_shift` [S_t, d_t], `target_scale` [S_t, 1], set from data by `set_target_stats`): M starts
            at the mean target and its body works in normalised units (GlueGen normalises targets per position);
            N sees targets normalised the same way.
        linear_skip: M = linear map + G(mixer body), with the linear map Y = P (X W) + B of mtn.baselines
            (set from a ridge fit by `init_linear_skip`; jobs/train_mtn.py keeps it fixed) and G a
            zero-initialised linear layer: M starts exactly at the closed-form baseline, and training learns the
            residual a linear map cannot explain.
    """

    @register_to_config
    def __init__(
        self,
        source_dim: int,
        target_dim: int,
        source_len: int = 77,
        target_len: int = 77,
        num_modules: int = 3,
        hidden_dim: int | None = None,
        decoder_hidden_dim: int | None = None,
        mult: int = 2,
        dropout: float = 0.0,
        with_decoder: bool = True,
        target_stats: bool = False,
        linear_skip: bool = False,
    ):
        super().__init__()
        for name, v in dict(source_dim=source_dim, target_dim=target_dim, source_len=source_len,
                            target_len=target_len, num_modules=num_modules, mult=mult).items():
            if not isinstance(v, int) or v < (0 if name == "num_modules" else 1):
                raise MTNError(f"ModelTranslationNetwork: {name} must be a positive integer, got {v!r}")
        self.encoder = MixerTranslator(source_dim, source_len, target_dim, target_len, num_modules,
                                       hidden_dim, mult, dropout)
        self.decoder = (MixerTranslator(target_dim, target_len, source_dim, source_len, num_modules,
                                        decoder_hidden_dim, mult, dropout) if with_decoder else None)
        if target_stats and linear_skip:
            raise MTNError("ModelTranslationNetwork: target_stats and linear_skip are exclusive (the linear map's "
                           "per-position bias already starts M at the mean target)")
        if linear_skip:
            self.skip_channel = nn.Parameter(torch.zeros(source_dim, target_dim))  # W [d_s, d_t]
            self.skip_sequence = nn.Parameter(torch.eye(target_len, source_len))  # P [S_t, S_s]
            self.skip_bias = nn.Parameter(torch.zeros(target_len, target_dim))  # B [S_t, d_t]
            # the body's contribution goes through a zero-initialised d_t x d_t map: exactly the linear map at
            # step 0, and (unlike a scalar gate) a full-rank path the body's gradients open from the first step
            self.skip_out = nn.Linear(target_dim, target_dim)
            nn.init.zeros_(self.skip_out.weight)
            nn.init.zeros_(self.skip_out.bias)
        if target_stats:
            self.register_buffer("target_shift", torch.zeros(target_len, target_dim))  # [S_t, d_t]
            self.register_buffer("target_scale", torch.ones(target_len, 1))  # [S_t, 1]

    @torch.no_grad()
    def init_linear_skip(self, linear) -> None:
        """Copy a fitted mtn.baselines.LinearTranslationMap into the skip path."""
        if not self.config.linear_skip:
            raise MTNError("this MTN was built with linear_skip=False")
        self.skip_channel.copy_(linear.channel)
        self.skip_sequence.copy_(linear.sequence)
        self.skip_bias.copy_(linear.bias)

    @torch.no_grad()
    def set_target_stats(self, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Per-position mean and RMS spread of target features [N, S_t, d_t] (positions with no valid row keep
        the global statistics)."""
        if not self.config.target_stats:
            raise MTNError("this MTN was built with target_stats=False")
        t = target.float()
        m = torch.ones(t.shape[:2]) if mask is None else mask.float()  # [N, S_t]
        n = m.sum(0).unsqueeze(-1)  # [S_t, 1]
        mean = torch.einsum("ns,nsd->sd", m, t) / n.clamp_min(1.0)  # [S_t, d_t]
        var = torch.einsum("ns,nsd->s", m, (t - mean).pow(2)) / (n.squeeze(-1) * t.shape[-1]).clamp_min(1.0)
        global_mean = (t * m.unsqueeze(-1)).sum((0, 1)) / m.sum().clamp_min(1.0)  # [d_t]
        empty = n.squeeze(-1) == 0
        mean[empty] = global_mean
        std = var.sqrt().clamp_min(1e-4)
        std[empty] = std[~empty].mean() if (~empty).any() else 1.0
        self.target_shift.copy_(mean)
        self.target_scale.copy_(std.unsqueeze(-1))

    @classmethod
    def from_named_size(cls, size: str, **kwargs) -> ModelTranslationNetwork:
        if size not in NAMED_SIZES:
            raise MTNError(f"unknown MTN size {size!r}; choose one of {sorted(NAMED_SIZES)}")
        return cls(**{**NAMED_SIZES[size], **kwargs})

    def _check(self, x: torch.Tensor, dim: int, length: int, what: str) -> None:
        if x.ndim != 3 or x.shape[1] != length or x.shape[2] != dim:
            raise MTNError(f"MTN expects {what} features of shape [B, {length}, {dim}], got {list(x.shape)}")

    def encode(self, source: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """M: [B, S_s, d_s] (+ mask [B, S_s]) -> [B, S_t, d_t]."""
        self._check(source, self.config.source_dim, self.config.source_len, "source")
        out = self.encoder(source, mask)  # [B, S_t, d_t]
        if self.config.target_stats:
            out = out * self.target_scale + self.target_shift  # back to raw target units
        if self.config.linear_skip:
            x = source if mask is None else source * mask.unsqueeze(-1).to(source.dtype)  # [B, S_s, d_s]
            linear = torch.einsum("ts,bsd->btd", self.skip_sequence, x @ self.skip_channel) + self.skip_bias
            out = linear + self.skip_out(out)  # [B, S_t, d_t]
        return out

    def decode(self, target: torch.Tensor) -> torch.Tensor:
        """N: [B, S_t, d_t] -> [B, S_s, d_s]."""
        if self.decoder is None:
            raise MTNError("this MTN was built with with_decoder=False; decode() is unavailable")
        self._check(target, self.config.target_dim, self.config.target_len, "target")
        if self.config.target_stats:
            target = (target - self.target_shift) / self.target_scale  # [B, S_t, d_t], normalised
        return self.decoder(target)

    def forward(self, source: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(source, mask)

    def num_parameters_of(self, part: str = "encoder") -> int:
        return sum(p.numel() for p in getattr(self, part).parameters())


class TokenDiscriminator(ModelMixin, ConfigMixin):
    """Token-wise D for L_adv: [B, S, d_t] -> logits [B, S] (real target token vs translated token)."""

    @register_to_config
    def __init__(self, dim: int, hidden_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # [B, S]
