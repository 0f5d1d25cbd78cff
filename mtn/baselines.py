"""Closed-form baselines an MTN must beat, with the MTN's interface (`encode(source, mask) -> [B, S_t, d_t]`).

LinearTranslationMap: Y = P (X W) + B, a ridge map over channels (W [d_s, d_t]) and a sequence projection
(P [S_t, S_s]) with a per-position bias (B [S_t, d_t]), fitted by alternating least squares (each block is a
ridge regression given the others, so the loss never increases).
PooledLinearMap (M-CLIP style): masked-mean-pooled source -> pooled target by ridge; the one predicted vector is
repeated at every target position, so its token MSE shows what a pooled method loses.

Both are diffusers ModelMixin/ConfigMixin models: save_pretrained/from_pretrained, and a translator folder holds
them like an MTN (translator.json records `model_class`).
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from mtn.errors import MTNError

CHUNK = 1024  # rows per pass: the cache is fp16, the normal equations accumulate in fp32 (fp64 for the solves)


class LinearTranslationMap(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, source_dim: int, target_dim: int, source_len: int, target_len: int):
        super().__init__()
        self.channel = nn.Parameter(torch.zeros(source_dim, target_dim))  # W [d_s, d_t]
        eye = torch.zeros(target_len, source_len)
        eye[: min(target_len, source_len), : min(target_len, source_len)].fill_diagonal_(1.0)
        self.sequence = nn.Parameter(eye)  # P [S_t, S_s]
        self.bias = nn.Parameter(torch.zeros(target_len, target_dim))  # B [S_t, d_t]

    def encode(self, source: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            source = source * mask.unsqueeze(-1).to(source.dtype)  # padded positions carry nothing, as in the MTN
        u = source @ self.channel  # [B, S_s, d_t]
        return torch.einsum("ts,bsd->btd", self.sequence, u) + self.bias  # [B, S_t, d_t]

    forward = encode


class PooledLinearMap(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, source_dim: int, target_dim: int, source_len: int, target_len: int):
        super().__init__()
        self.proj = nn.Linear(source_dim, target_dim)

    def encode(self, source: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = (torch.ones(source.shape[:2], device=source.device) if mask is None else mask).to(source.dtype)
        pooled = (source * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)  # [B, d_s]
        return self.proj(pooled).unsqueeze(1).expand(-1, self.config.target_len, -1)  # [B, S_t, d_t]

    forward = encode


# ----------------------------------------------------------------------------------------------- fitting
def _chunks(feats: dict, on_mask: bool):
    """fp32 chunks trimmed to their longest real source (and target, when only real target tokens count):
    positions past those are zeros / unscored, and skipping them makes a fit several times cheaper."""
    n = len(feats["source"])
    for i in range(0, n, CHUNK):
        xm, ym = feats["source_mask"][i:i + CHUNK].float(), feats["target_mask"][i:i + CHUNK].float()
        ls = max(int(xm.sum(1).max()), 1)
        lt = max(int(ym.sum(1).max()), 1) if on_mask else ym.shape[1]
        x = feats["source"][i:i + CHUNK, :ls].float() * xm[:, :ls].unsqueeze(-1)  # [b, ls, d_s], pads zeroed
        y = feats["target"][i:i + CHUNK, :lt].float()  # [b, lt, d_t]
        m = ym[:, :lt] if on_mask else torch.ones_like(ym)  # [b, lt] weight of each target position
        yield x, xm[:, :ls], y, m, ls, lt


def _ridge(gram: torch.Tensor, rhs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Solve (G + alpha * mean(diag G) I) X = R in float64; alpha is relative to the mean feature energy."""
    g = gram.double()
    lam = alpha * g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # [] or [T]
    eye = torch.eye(g.shape[-1], dtype=g.dtype)
    return torch.linalg.solve(g + lam[..., None, None] * eye, rhs.double()).float()


@torch.no_grad()
def fit_linear_map(feats: dict, alpha: float = 1e-3, iters: int = 5, on_mask: bool = True,
                   progress=None) -> LinearTranslationMap:
    """ALS for Y ~ P (X W) + B on feature-cache rows (source, source_mask, target, target_mask)."""
    n, s_len, d_s = feats["source"].shape
    _, t_len, d_t = feats["target"].shape
    if n < 2:
        raise MTNError(f"the linear baseline needs at least 2 training rows, got {n}")
    model = LinearTranslationMap(d_s, d_t, s_len, t_len)
    W, P, B = model.channel.data, model.sequence.data, model.bias.data
    for it in range(iters):
        # W-step: rows of Z = P X at scored target positions regress Y - B over channels
        gram, rhs = torch.zeros(d_s, d_s), torch.zeros(d_s, d_t)
        for x, _, y, m, ls, lt in _chunks(feats, on_mask):
            z = torch.einsum("ts,bsd->btd", P[:lt, :ls], x)  # [b, lt, d_s]
            keep = m > 0
            zk, rk, wk = z[keep], (y - B[:lt])[keep], m[keep].unsqueeze(-1)  # [R, d_s], [R, d_t], [R, 1]
            gram += zk.T @ (zk * wk)
            rhs += zk.T @ (rk * wk)
        W.copy_(_ridge(gram, rhs, alpha))
        # P-step: per target position t, Y[t] - B[t] = sum_s P[t, s] U[s] with U = X W, one ridge per t
        gram, rhs = torch.zeros(t_len, s_len, s_len), torch.zeros(t_len, s_len)
        for x, xm, y, m, ls, lt in _chunks(feats, on_mask):
            u = torch.zeros(*x.shape[:2], d_t)
            u[xm > 0] = x[xm > 0] @ W  # [b, ls, d_t], only real source tokens (the rest is zero anyway)
            gram[:lt, :ls, :ls] += torch.einsum("bt,bij->tij", m, u @ u.transpose(1, 2))  # [lt, ls, ls]
            # two steps, never the [b, lt, ls, d] intermediate a 3-operand einsum may build
            rhs[:lt, :ls] += torch.einsum("bt,bts->ts", m, (y - B[:lt]) @ u.transpose(1, 2))
        P.copy_(_ridge(gram, rhs.unsqueeze(-1), alpha).squeeze(-1))
        # B-step: the mean residual per position (exact least squares for the bias)
        total, count = torch.zeros(t_len, d_t), torch.zeros(t_len, 1)
        for x, _, y, m, ls, lt in _chunks(feats, on_mask):
            pred = torch.einsum("ts,bsd->btd", P[:lt, :ls], x @ W)  # [b, lt, d_t] without the bias
            total[:lt] += torch.einsum("bt,btd->td", m, y - pred)
            count[:lt] += m.sum(0).unsqueeze(-1)
        B.copy_(total / count.clamp_min(1.0))
        if progress:
            progress(it + 1, iters)
    return model


@torch.no_grad()
def fit_pooled_linear(feats: dict, alpha: float = 1e-3) -> PooledLinearMap:
    n, s_len, d_s = feats["source"].shape
    _, t_len, d_t = feats["target"].shape
    model = PooledLinearMap(d_s, d_t, s_len, t_len)
    gram, rhs = torch.zeros(d_s + 1, d_s + 1), torch.zeros(d_s + 1, d_t)
    for x, xm, y, ym, _, _ in _chunks(feats, on_mask=True):
        px = x.sum(1) / xm.sum(1, keepdim=True).clamp_min(1.0)  # [b, d_s]
        py = (y * ym.unsqueeze(-1)).sum(1) / ym.sum(1, keepdim=True).clamp_min(1.0)  # [b, d_t]
        px = torch.cat([px, torch.ones(len(px), 1)], 1)  # [b, d_s + 1]: the last column fits the bias
        gram += px.T @ px
        rhs += px.T @ py
    sol = _ridge(gram, rhs, alpha)  # [d_s + 1, d_t]
    model.proj.weight.data.copy_(sol[:-1].T)
    model.proj.bias.data.copy_(sol[-1])
    return model


@torch.no_grad()
def predict(model, feats: dict, batch_size: int = 256) -> torch.Tensor:
    """Any translation model over cached rows -> [N, S_t, d_t] float32."""
    p = next(model.parameters())
    return torch.cat([model.encode(feats["source"][i:i + batch_size].to(p.device, p.dtype),
                                   feats["source_mask"][i:i + batch_size].to(p.device)).float().cpu()
                      for i in range(0, len(feats["source"]), batch_size)])


# --------------------------------------------------------------------------- in the training job


def fit_baseline(cfg, method: str, rows: dict, val: dict | None):
    """Closed-form fit on rank 0 -> (model, {val/...} metrics)."""
    from mtn.metrics import alignment_metrics

    if method == "linear":
        model = fit_linear_map(rows, cfg.ridge_alpha, on_mask=cfg.mse_on_mask,
                               progress=lambda i, n: print(f"linear map: ALS pass {i}/{n}"))
    else:
        model = fit_pooled_linear(rows, cfg.ridge_alpha)
    metrics = {} if val is None else {f"val/{k}": v for k, v in alignment_metrics(
        predict(model, val), val["target"], val["target_mask"], target_ids=val.get("target_id")).items()}
    return model, metrics


def linear_margin(linear_fit, val: dict | None, metrics: dict) -> dict:
    """The MTN's margin over the linear map fitted on the same data: positive = the MTN is better."""
    from mtn.metrics import alignment_metrics

    if val is None or "val/token_mse" not in metrics:
        return {}
    lin = {f"val/{k}": v for k, v in alignment_metrics(predict(linear_fit(), val), val["target"],
                                                       val["target_mask"], target_ids=val.get("target_id")).items()}
    out = {f"val/linear_{k.removeprefix('val/')}": v for k, v in lin.items()}
    out["val/margin_token_mse_pct"] = 100.0 * (1.0 - metrics["val/token_mse"] / lin["val/token_mse"])
    out["val/margin_pooled_cosine"] = metrics["val/pooled_cosine"] - lin["val/pooled_cosine"]
    out["val/margin_r@1"] = metrics["val/r@1"] - lin["val/r@1"]
    return out
