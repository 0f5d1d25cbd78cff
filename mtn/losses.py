"""MTN training losses: pure functions of tensors (and of the modules they need to call).

Total loss = w_mse * L_mse + w_adv * L_adv + w_rec * L_rec + w_cycle * L_cycle, each weight from the config;
a weight of 0 switches the term off (and skips its forward pass).

Default weights (DEFAULT_WEIGHTS) and why:
- mse 1.0: the alignment term, the one the UNet's cross-attention actually needs.
- rec 0.1: N(M(s)) ~ s keeps M information-preserving (GlueGen's autoencoder objective) without competing
  with alignment; the paper reports it as a regulariser, so it gets a tenth of the weight.
- cycle 0.1: M(N(M(s))) ~ M(s) (closed loop) ties the decoder back to the target space; same reasoning.
- adv 0.0 (off): the paper reports limited gains from the adversarial term and GAN terms are the usual
  source of instability; switch it on with loss_adv=0.01 to reproduce the paper's full objective.

L_adv uses a gradient-reversal layer (GRL), not a separate non-saturating generator step: D minimises the
binary cross-entropy of real-vs-translated tokens, and the same backward pass hands M the negated gradient,
so M maximises D's loss (the original minimax game). One loss, one optimizer, one backward: this is what
lets D and M live in a single DeepSpeed engine under any ZeRO stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_WEIGHTS = {"mse": 1.0, "adv": 0.0, "rec": 0.1, "cycle": 0.1}


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of (pred - target)^2 over channels and the positions where mask == 1 (all when mask is None)."""
    sq = (pred.float() - target.float()).pow(2).mean(-1)  # [B, S]
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)  # [B, S]
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def mse_loss(translated, target, target_mask=None):
    """L_mse: M(F_s(x)) vs F_t(x). Pass target_mask to score only real target tokens; the default scores all
    S_t positions because the UNet attends to every one of them (padding included)."""
    return masked_mse(translated, target, target_mask)


def reconstruction_loss(reconstructed, source, source_mask=None):
    """L_rec: N(M(s)) vs s, on real source tokens only (padding content is arbitrary and masked out of M)."""
    return masked_mse(reconstructed, source, source_mask)


def cycle_loss(re_translated, translated):
    """Closed loop: M(N(M(s))) vs M(s). The anchor M(s) is detached so this term trains the loop, not the
    anchor (otherwise it could shrink both sides to agree)."""
    return masked_mse(re_translated, translated.detach())


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward, -scale * gradient backward."""
    return _GradReverse.apply(x, scale)


def adversarial_loss(discriminator, translated, target, target_mask=None):
    """L_adv with a gradient-reversal layer: BCE of D on real target tokens (label 1) and translated tokens
    (label 0, through the GRL so M is pushed to fool D). Masked to real target tokens when a mask is given."""
    real_logits = discriminator(target.detach())  # [B, S_t]
    fake_logits = discriminator(grad_reverse(translated))  # [B, S_t]
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="none")
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="none")
    per_token = 0.5 * (real + fake)  # [B, S_t]
    if target_mask is None:
        return per_token.mean()
    m = target_mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def mtn_losses(mtn, discriminator, source, source_mask, target, target_mask, weights, mse_on_mask=False):
    """All enabled terms for one batch. Returns (total, {name: detached value}).

    source [B, S_s, d_s], source_mask [B, S_s], target [B, S_t, d_t], target_mask [B, S_t], in raw units. An MTN
    built with standardize=True is trained (and its terms reported) in standardised units.
    """
    if getattr(mtn.config, "standardize", False):
        # every term in standardised units: no channel weighs in the MSE by its raw scale alone
        source, target = mtn.normalize(source, "source"), mtn.normalize(target, "target")  # [B, S_s, d_s], [B, S_t, d_t]
        encode, decode = mtn.encoder, mtn.decoder  # the bodies: standardised in, standardised out
    else:
        encode, decode = mtn.encode, mtn.decode
    translated = encode(source, source_mask)  # [B, S_t, d_t]
    terms = {}
    if weights.get("mse", 0):
        terms["mse"] = mse_loss(translated, target, target_mask if mse_on_mask else None)
    if weights.get("adv", 0):
        terms["adv"] = adversarial_loss(discriminator, translated, target, target_mask)
    if weights.get("rec", 0) or weights.get("cycle", 0):
        reconstructed = decode(translated)  # [B, S_s, d_s]: N fed M's prediction, not the true target
        if weights.get("rec", 0):
            terms["rec"] = reconstruction_loss(reconstructed, source, source_mask)
        if weights.get("cycle", 0):
            terms["cycle"] = cycle_loss(encode(reconstructed, source_mask), translated)
    if not terms:
        raise ValueError("all loss weights are 0: nothing to train")
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}
