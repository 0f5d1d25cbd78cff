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

`block_layout="mixer"` (the recipe of jobs/configs/multi30k.yaml) replaces that body by standard pre-LN MLP-mixer
blocks (LayerNorm over channels -> token mixing over the S_t positions; LayerNorm -> channel mixing; each residual)
and a final LayerNorm + linear output map; `num_modules` then counts blocks. With `standardize=True` the model holds
per-channel mean/std of source and target features (buffers set from training data by `set_feature_stats`): its
body works in standardised units, `encode`/`decode` take and return raw units, and the training losses
(mtn/losses.py) compare standardised features, so that no channel dominates the MSE by its scale alone.
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


class MixerBlock(nn.Module):
    """Pre-LN MLP-mixer block on [B, S, d]: token mixing across the S positions, then channel mixing, each residual
    (LayerNorm over channels in both, as in Tolstikhin et al. 2021)."""

    def __init__(self, seq_len: int, dim: int, mult: int = 2, dropout: float = 0.0):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(seq_len, seq_len * mult)
        self.token_fc2 = nn.Linear(seq_len * mult, seq_len)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, dim * mult)
        self.channel_fc2 = nn.Linear(dim * mult, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, d]
        y = self.token_norm(x).transpose(1, 2)  # [B, d, S]
        y = self.token_fc2(self.drop(nn.functional.gelu(self.token_fc1(y))))  # [B, d, S]
        x = x + y.transpose(1, 2)  # [B, S, d]
        y = self.channel_fc2(self.drop(nn.functional.gelu(self.channel_fc1(self.channel_norm(x)))))  # [B, S, d]
        return x + y


class MixerStack(nn.Module):
    """[B, S_in, d_in] (+ mask) -> [B, S_out, d_out]: input proj, sequence proj, K mixer blocks, LayerNorm, linear."""

    def __init__(self, in_dim, in_len, out_dim, out_len, num_blocks, hidden_dim=None, mult=2, dropout=0.0):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.seq_proj = nn.Linear(in_len, out_len)  # copy position i -> i at init, as in MixerTranslator
        with torch.no_grad():
            self.seq_proj.weight.copy_(torch.eye(out_len, in_len))
            self.seq_proj.bias.zero_()
        self.blocks = nn.ModuleList([MixerBlock(out_len, hidden_dim, mult, dropout) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_proj(x)  # [B, S_in, d_h]
        if mask is not None:
            x = x * mask.to(x.dtype).unsqueeze(-1)  # padded positions (and in_proj's bias there) carry nothing
        x = self.seq_proj(x.transpose(1, 2)).transpose(1, 2)  # [B, S_out, d_h]
        for block in self.blocks:
            x = block(x)  # [B, S_out, d_h]
        return self.out(self.norm(x))  # [B, S_out, d_out]


LAYOUTS = {"gluegen": MixerTranslator, "mixer": MixerStack}


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
        block_layout: "gluegen" (residual modules as in the released GlueGen translator; the default, so folders
            saved before this option load unchanged) or "mixer" (pre-LN mixer blocks + final LayerNorm + linear).
        decoder_modules: modules/blocks of N (default num_modules); the decoder only regularises M in training.
        standardize: per-channel standardisation of source and target (see the module docstring).
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
        block_layout: str = "gluegen",
        decoder_modules: int | None = None,
        standardize: bool = False,
    ):
        super().__init__()
        decoder_modules = num_modules if decoder_modules is None else decoder_modules
        for name, v in dict(source_dim=source_dim, target_dim=target_dim, source_len=source_len,
                            target_len=target_len, num_modules=num_modules, mult=mult,
                            decoder_modules=decoder_modules).items():
            if not isinstance(v, int) or v < (0 if name.endswith("modules") else 1):
                raise MTNError(f"ModelTranslationNetwork: {name} must be a positive integer, got {v!r}")
        if block_layout not in LAYOUTS:
            raise MTNError(f"ModelTranslationNetwork: block_layout must be one of {sorted(LAYOUTS)}, "
                           f"got {block_layout!r}")
        if standardize and (target_stats or linear_skip):
            raise MTNError("ModelTranslationNetwork: standardize replaces target_stats and linear_skip; "
                           "turn those off")
        stack = LAYOUTS[block_layout]
        self.encoder = stack(source_dim, source_len, target_dim, target_len, num_modules, hidden_dim, mult, dropout)
        self.decoder = (stack(target_dim, target_len, source_dim, source_len, decoder_modules, decoder_hidden_dim,
                              mult, dropout) if with_decoder else None)
        if standardize:  # identity until set_feature_stats; saved with the weights
            for side, dim in (("source", source_dim), ("target", target_dim)):
                self.register_buffer(f"{side}_mean", torch.zeros(dim))  # [d]
                self.register_buffer(f"{side}_std", torch.ones(dim))  # [d]
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

    @torch.no_grad()
    def set_feature_stats(self, rows: dict, chunk: int = 2048) -> None:
        """Per-channel mean and std of source and target features over their valid tokens; `rows` holds
        source [N, S_s, d_s], source_mask [N, S_s], target [N, S_t, d_t], target_mask [N, S_t] (a feature cache)."""
        if not self.config.standardize:
            raise MTNError("this MTN was built with standardize=False")
        for side in ("source", "target"):
            feats, mask = rows[side], rows[f"{side}_mask"]
            d = feats.shape[-1]
            total, sq, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0.0
            for i in range(0, len(feats), chunk):
                m = mask[i:i + chunk].bool()  # [b, S]
                x = feats[i:i + chunk][m].double()  # [tokens, d]
                total += x.sum(0)
                sq += x.pow(2).sum(0)
                count += len(x)
            if count < 2:
                raise MTNError(f"feature statistics need at least 2 valid {side} tokens, got {int(count)}")
            mean = total / count
            std = (sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-4)
            getattr(self, f"{side}_mean").copy_(mean.float())
            getattr(self, f"{side}_std").copy_(std.float())

    def normalize(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """Raw -> standardised units ([..., d]); identity when the model does not standardise."""
        if not self.config.standardize:
            return x
        return (x - getattr(self, f"{side}_mean").to(x.dtype)) / getattr(self, f"{side}_std").to(x.dtype)

    def denormalize(self, x: torch.Tensor, side: str) -> torch.Tensor:
        if not self.config.standardize:
            return x
        return x * getattr(self, f"{side}_std").to(x.dtype) + getattr(self, f"{side}_mean").to(x.dtype)

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
        out = self.encoder(self.normalize(source, "source"), mask)  # [B, S_t, d_t]
        out = self.denormalize(out, "target")  # raw target units (a no-op without standardize)
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
        return self.denormalize(self.decoder(self.normalize(target, "target")), "source")  # [B, S_s, d_s]

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
