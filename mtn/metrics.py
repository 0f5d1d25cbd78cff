"""Alignment metrics between translated and true target features (defined once, used by every job).

token_mse: mean over valid target tokens (target mask) and channels of (pred - true)^2, raw target units.
pooled_cosine: cosine of mean-pooled prediction vs mean-pooled truth, both pooled with the target mask.
recall_at_k: pooled prediction i retrieves caption i among the N of the set by cosine. With `target_ids` (rows with
the same id share one target caption, e.g. a multilingual val set holding each English caption once per language)
the candidates are the distinct targets: an identical caption is the right answer, never a distractor.
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


def recall_at_k(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, k: int = 1,
                target_ids: torch.Tensor | None = None) -> float:
    p = F.normalize(masked_mean_pool(pred.float(), mask), dim=-1)  # [N, d]
    t = F.normalize(masked_mean_pool(true.float(), mask), dim=-1)  # [N, d]
    if target_ids is None:
        answer = torch.arange(len(t))  # [N]
    else:
        ids = torch.as_tensor(target_ids).long()
        uniq, answer = torch.unique(ids, return_inverse=True)  # answer[i]: row i's distinct target
        # [U, d]: one row per distinct target (rows of one caption are the same text: their mean is that caption)
        t = F.normalize(torch.zeros(len(uniq), t.shape[1]).index_add_(0, answer, t), dim=-1)
    sim = p @ t.T  # [N, U]: row i = prediction i against every distinct true caption
    topk = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [N, k]
    hits = (topk == answer.unsqueeze(1)).any(1)
    return float(hits.float().mean())


def alignment_metrics(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, ks=(1, 5),
                      target_ids: torch.Tensor | None = None) -> dict:
    out = {"token_mse": token_mse(pred, true, mask), "pooled_cosine": pooled_cosine(pred, true, mask)}
    for k in ks:
        out[f"r@{k}"] = recall_at_k(pred, true, mask, k, target_ids)
    return out


def target_ids(pairs: list[tuple[str, str]]) -> torch.Tensor:
    """[N] ids of the distinct target texts of (source, target) pairs, for recall_at_k over distinct targets."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(t, len(seen)) for _, t in pairs], dtype=torch.long)
