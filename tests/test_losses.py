import pytest
import torch

from mtn.losses import DEFAULT_WEIGHTS, adversarial_loss, grad_reverse, masked_mse, mtn_losses
from mtn.model import ModelTranslationNetwork, TokenDiscriminator


def problem(seed=0, n=32):
    """Source = random tokens; target = a fixed random linear map of them (a learnable translation)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, 6, 8, generator=g)
    mask = torch.ones(n, 6)
    mask[::2, 4:] = 0
    w = torch.randn(8, 12, generator=g) / 3
    tgt = (src[:, :5] * mask[:, :5, None]) @ w  # [n, 5, 12]
    return src, mask, tgt, torch.ones(n, 5)


@pytest.mark.parametrize("term", ["mse", "rec", "cycle", "adv"])
def test_each_loss_decreases_when_trained_alone(term):
    torch.manual_seed(0)
    src, mask, tgt, tmask = problem()
    mtn = ModelTranslationNetwork(source_dim=8, target_dim=12, source_len=6, target_len=5, num_modules=1,
                                  hidden_dim=16)
    disc = TokenDiscriminator(12, hidden_dim=16)
    weights = {k: float(k == term) for k in DEFAULT_WEIGHTS}
    opt = torch.optim.Adam([*mtn.parameters(), *disc.parameters()], lr=3e-3)
    if term == "adv":
        # with a gradient-reversal layer the total is a minimax value: what must fall is D's loss when D alone
        # trains (M frozen), i.e. the term is wired as a proper discriminator objective
        mtn.requires_grad_(False)
    values = []
    for _ in range(60):
        total, terms = mtn_losses(mtn, disc, src, mask, tgt, tmask, weights)
        assert set(terms) == {term}
        opt.zero_grad()
        total.backward()
        opt.step()
        values.append(total.item())
    assert values[-1] < 0.7 * values[0], (term, values[0], values[-1])


def test_grad_reverse_negates_gradient():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 2.0) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-2.0, -4.0, -6.0]))


def test_adversarial_pushes_translator_to_fool_discriminator():
    torch.manual_seed(0)
    disc = TokenDiscriminator(4, hidden_dim=8)
    fake = torch.zeros(2, 3, 4, requires_grad=True)
    adversarial_loss(disc, fake, torch.ones(2, 3, 4)).backward()
    # M's gradient is the reverse of D's: a step along -grad must make D's logits on fakes go up (look real)
    before = disc(fake).mean()
    after = disc(fake - 0.5 * fake.grad).mean()
    assert after > before


def test_masked_mse_and_zero_weights():
    a, b = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    assert float(masked_mse(a, b)) == pytest.approx((1 + 4 + 81) / 3)
    assert float(masked_mse(a, b, torch.tensor([[1, 1, 0]]))) == pytest.approx(2.5)
    src, mask, tgt, tmask = problem()
    mtn = ModelTranslationNetwork(source_dim=8, target_dim=12, source_len=6, target_len=5, num_modules=1)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        mtn_losses(mtn, None, src, mask, tgt, tmask, {"mse": 0, "adv": 0, "rec": 0, "cycle": 0})


def test_standardized_model_trains_in_standardized_units():
    torch.manual_seed(0)
    mtn = ModelTranslationNetwork(source_dim=8, target_dim=6, source_len=5, target_len=4, num_modules=1,
                                  block_layout="mixer", standardize=True)
    rows = {"source": torch.randn(16, 5, 8), "source_mask": torch.ones(16, 5),
            "target": 100 * torch.randn(16, 4, 6) + 7, "target_mask": torch.ones(16, 4)}
    mtn.set_feature_stats(rows)
    total, terms = mtn_losses(mtn, None, rows["source"], rows["source_mask"], rows["target"], rows["target_mask"],
                              {"mse": 1.0, "rec": 1.0})
    with torch.no_grad():
        raw = masked_mse(mtn.encode(rows["source"], rows["source_mask"]), rows["target"])
        std = masked_mse(mtn.normalize(mtn.encode(rows["source"], rows["source_mask"]), "target"),
                         mtn.normalize(rows["target"], "target"))
        rec = masked_mse(mtn.decoder(mtn.encoder(mtn.normalize(rows["source"], "source"), rows["source_mask"])),
                         mtn.normalize(rows["source"], "source"), rows["source_mask"])
    assert float(terms["mse"]) == pytest.approx(float(std), rel=1e-4)
    assert float(raw) > 1000 * float(terms["mse"])  # raw units would be ~100^2 larger
    assert float(terms["rec"]) == pytest.approx(float(rec), rel=1e-4)
    assert float(total.detach()) == pytest.approx(float(terms["mse"] + terms["rec"]), rel=1e-5)
