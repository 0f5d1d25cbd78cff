import pytest
import torch

from mtn.metrics import alignment_metrics, recall_at_k, target_ids


def test_recall_counts_identical_captions_as_one_target():
    """A multilingual val set holds each English caption once per language: without ids, the other languages'
    copies of the right caption are distractors and R@1 cannot exceed 1/3."""
    torch.manual_seed(0)
    captions = torch.randn(5, 4, 8)  # 5 distinct target captions [N, S, d]
    true = captions.repeat_interleave(3, 0)  # [15, S, d]: each caption for de, fr, cs
    true = true + 1e-3 * torch.randn_like(true)  # encoded in different batches: not bitwise equal
    mask = torch.ones(15, 4)
    # a perfect translator up to the encoder's batch noise: each row lands on another language's copy of its caption
    pred = true[torch.tensor([3 * (i // 3) + (i + 1) % 3 for i in range(15)])]
    pairs = [(f"{lang}{i}", f"caption {i}") for i in range(5) for lang in ("de", "fr", "cs")]
    ids = target_ids(pairs)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert recall_at_k(pred, true, mask, 1) == 0.0  # the copies win over the row's own caption
    assert recall_at_k(pred, true, mask, 1, ids) == 1.0
    wrong = pred[torch.tensor([3, 4, 5] + list(range(3, 15)))]  # rows 0-2 predict caption 1
    assert recall_at_k(wrong, true, mask, 1, ids) == pytest.approx(12 / 15)
    m = alignment_metrics(pred, true, mask, target_ids=ids)
    assert m["r@1"] == 1.0 and m["r@5"] == 1.0 and m["token_mse"] < 1e-5
