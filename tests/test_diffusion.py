import random

import pytest
import torch
from diffusers import DDPMScheduler

from mtn.diffusion import EMA, diffusion_loss, drop_captions, image_grid, loss_weights, sample_noise, snr
from mtn.train.checkpoint import lr_factor


def test_ema_update_matches_the_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    ema = EMA(list(lin.parameters()) + [frozen], decay=0.9)
    assert len(ema.shadow) == 2  # frozen parameters are not tracked
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()  # update 0: decay = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow[0], 0.1 * w0 + 0.9 * (w0 + 1))
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()  # update 1: decay = min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow[0], d * (0.1 * w0 + 0.9 * (w0 + 1)) + (1 - d) * (w0 + 2))
    for _ in range(100):
        ema.update()
    assert ema.current_decay() == pytest.approx(0.9)
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target.parameters())
    assert torch.allclose(target.weight, ema.shadow[0])
    fresh = EMA(lin.parameters(), decay=0.5)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.updates == 102 and torch.equal(fresh.shadow[1], ema.shadow[1]) and fresh.decay == 0.9


def test_min_snr_weights():
    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 500, 999])
    s = snr(sched.alphas_cumprod, t)
    assert s[0] > s[1] > s[2] > 0
    w = loss_weights(sched.alphas_cumprod, t, "epsilon", 5.0)
    assert torch.allclose(w, torch.clamp(s, max=5.0) / s)
    assert w[0] < 1 and w[2] == pytest.approx(1.0)  # high-SNR (early) steps are down-weighted
    assert torch.equal(loss_weights(sched.alphas_cumprod, t, "epsilon", None), torch.ones(3))
    v = loss_weights(sched.alphas_cumprod, t, "v_prediction", 5.0)
    assert torch.allclose(v, torch.clamp(s, max=5.0) / (s + 1))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_loss_is_zero_for_the_exact_target(pred):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=pred)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = sample_noise(latents, g)
    t = torch.tensor([10, 700])
    exact = noise if pred == "epsilon" else sched.get_velocity(latents, noise, t)
    assert diffusion_loss(exact, latents, noise, t, sched, snr_gamma=5.0).item() == pytest.approx(0.0, abs=1e-10)
    assert diffusion_loss(exact + 1.0, latents, noise, t, sched).item() == pytest.approx(1.0)


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    a = sample_noise(latents, torch.Generator().manual_seed(1), 0.0)
    b = sample_noise(latents, torch.Generator().manual_seed(1), 0.5)
    diff = b - a  # [2, 4, 8, 8]: constant over h, w
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)) and diff.abs().max() > 0


def test_caption_dropout_is_seeded():
    caps = [f"c{i}" for i in range(1000)]
    out = drop_captions(caps, 0.1, random.Random(0))
    assert 50 < out.count("") < 150 and out == drop_captions(caps, 0.1, random.Random(0))
    assert drop_captions(caps, 0.0, random.Random(0)) == caps


def test_lr_factor_warmup_then_cosine():
    f = lr_factor("cosine", warmup_steps=10, max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.01 + 0.99 * 0.5) and f(110) == pytest.approx(0.01)
    assert lr_factor("constant", 0, 100)(50) == 1.0


def test_image_grid():
    from PIL import Image

    ims = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    grid = image_grid(ims, cols=2)
    assert grid.size == (8, 8) and grid.getpixel((5, 1)) == (0, 128, 0) and grid.getpixel((5, 5)) == (255, 255, 255)
