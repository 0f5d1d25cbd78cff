"""t-SNE map of source, target and translated sentence features (GlueGen paper Fig. 8 / 11).

Each caption is mask-mean-pooled per role. Target and translated features live in one space and share one PCA
basis, so their overlap on the map is meaningful. The source LM's space is another one (often another width):
it gets its own PCA basis, so the map shows its spread and how far it sits from the target, never a
point-to-point correspondence with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtn.metrics import masked_mean_pool

ROLES = {"source": ("tab:gray", "source LM"), "target": ("tab:blue", "target encoder"),
         "translated": ("tab:orange", "MTN(source)")}
MARKERS = "o^sDvP*X"


def pooled(x: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    return masked_mean_pool(x.float(), mask).numpy()  # [N, d]


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    x = x - x.mean(0, keepdims=True)  # [N, d]
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:k].T  # [N, k]


def tsne_map(groups: dict[str, dict[str, np.ndarray]], path: str | Path, seed: int = 0, pca_dim: int = 32) -> Path:
    """groups: {language: {"source": [N, d_s], "target": [N, d_t], "translated": [N, d_t]}} pooled features
    -> one PNG with a point per caption and role, marker per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    langs = list(groups)
    shared = np.concatenate([groups[lg][r] for lg in langs for r in ("target", "translated")])  # [M, d_t]
    source = np.concatenate([groups[lg]["source"] for lg in langs])  # [N_s, d_s]
    k = max(2, min(pca_dim, shared.shape[1], source.shape[1], len(source) - 1))
    shared_k, source_k = _pca(shared, k), _pca(source, k)
    # one joint embedding, so distances between roles and languages are read on the same map
    xy = TSNE(n_components=2, perplexity=min(30.0, (len(shared_k) + len(source_k) - 1) / 3), init="pca",
              random_state=seed).fit_transform(np.concatenate([shared_k, source_k]))  # [M + N_s, 2]
    labels = [(lg, r) for lg in langs for r in ("target", "translated") for _ in range(len(groups[lg][r]))]
    labels += [(lg, "source") for lg in langs for _ in range(len(groups[lg]["source"]))]
    fig, ax = plt.subplots(figsize=(7, 6))
    for li, lg in enumerate(langs):
        for role, (color, text) in ROLES.items():
            idx = [i for i, (a, b) in enumerate(labels) if a == lg and b == role]
            ax.scatter(xy[idx, 0], xy[idx, 1], s=8, c=color, marker=MARKERS[li % len(MARKERS)], alpha=0.6,
                       label=f"{text} ({lg})")
    ax.set(title="t-SNE of pooled sentence features", xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
