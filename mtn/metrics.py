"""Alignment metrics between translated and true target features (defined once, used by every job).

token_mse: mean over valid target tokens (target mask) and channels of (pred - true)^2, raw target units.
pooled_cosine: cosine of mean-pooled prediction vs mean-pooled truth, both pooled with the target mask.
recall_at_k: pooled prediction i retrieves caption i among the N of the set by cosine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtn.losses import masked_mse


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, S, 1]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B, d]


def token_mse(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    return float(masked_mse(pred, true, mask))  # the training loss's own masked MSE, as a number


def pooled_cosine(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> float:
    p, t = masked_mean_pool(pred.float(), mask), masked_mean_pool(true.float(), mask)  # [B, d]
    return float(F.cosine_similarity(p, t, dim=-1).mean())


def recall_at_k(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, k: int = 1) -> float:
    p = F.normalize(masked_mean_pool(pred.float(), mask), dim=-1)  # [N, d]
    t = F.normalize(masked_mean_pool(true.float(), mask), dim=-1)  # [N, d]
    sim = p @ t.T  # [N, N]: row i = prediction i against every true caption
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [N, k]
    hits = (topk == torch.arange(sim.shape[0]).unsqueeze(1)).any(1)
    return float(hits.float().mean())


def alignment_metrics(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, ks=(1, 5)) -> dict:
    out = {"token_mse": token_mse(pred, true, mask), "pooled_cosine": pooled_cosine(pred, true, mask)}
    for k in ks:
        out[f"r@{k}"] = recall_at_k(pred, true, mask, k)
    return out
