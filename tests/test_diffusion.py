import random

import pytest
import torch
from diffusers import DDPMScheduler

from mtn.diffusion import diffusion_loss, drop_captions, image_grid, loss_weights, sample_noise
from mtn.finetune import load_ema, make_ema, save_ema

T = torch.tensor([0, 100, 500, 999])
# min-SNR-5 weights of the hand-written alpha_bar / (1 - alpha_bar) version this replaced, on the default linear
# betas: diffusers' compute_snr (sqrt(alpha_bar) / sqrt(1 - alpha_bar))^2 must give the same
MIN_SNR_5 = {"epsilon": [5.00132970e-04, 5.85709929e-01, 1.0, 1.0],
             "v_prediction": [5.00082970e-04, 5.24293184e-01, 7.77966529e-02, 4.03583035e-05]}


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_pinned_values(pred):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=pred)
    assert loss_weights(sched, T, 5.0).tolist() == pytest.approx(MIN_SNR_5[pred], rel=1e-5)
    assert torch.equal(loss_weights(sched, T, None), torch.ones(4))


def test_ema_follows_diffusers_warmup_and_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    ema = make_ema(lin, decay=0.9)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.step(lin.parameters())  # update 1: decay 0, the shadow becomes the weights
    assert torch.equal(ema.shadow_params[0], w0 + 1)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.step(lin.parameters())  # update 2: decay min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.shadow_params[0], d * (w0 + 1) + (1 - d) * (w0 + 2))
    for _ in range(100):
        ema.step(lin.parameters())
    assert ema.cur_decay_value == pytest.approx(0.9)
    save_ema(ema, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.json", "ema.safetensors"]  # no pickle
    fresh = make_ema(torch.nn.Linear(3, 2), decay=0.5)
    load_ema(fresh, tmp_path)
    assert fresh.optimization_step == 102 and fresh.decay == 0.9
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, ema.shadow_params, strict=True))
    target = torch.nn.Linear(3, 2)
    fresh.copy_to(target.parameters())
    assert torch.equal(target.weight, ema.shadow_params[0])


def test_ema_of_another_model_is_refused(tmp_path):
    from mtn.errors import MTNError

    save_ema(make_ema(torch.nn.Linear(3, 2), 0.9), tmp_path)
    with pytest.raises(MTNError, match="holds 2 EMA tensors, the UNet has 4 parameters"):
        load_ema(make_ema(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)), 0.9), tmp_path)


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
    # min-SNR: each sample's squared error 1 is weighted by its timestep's weight, then averaged
    weights = loss_weights(sched, t, 5.0)
    assert diffusion_loss(exact + 1.0, latents, noise, t, sched, 5.0).item() == pytest.approx(weights.mean().item())


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    a = sample_noise(latents, torch.Generator().manual_seed(1), 0.0)
    b = sample_noise(latents, torch.Generator().manual_seed(1), 0.5)
    diff = b - a  # [2, 4, 8, 8]: constant over h, w, and 0.5 x the next 8 standard normals of the generator
    g = torch.Generator().manual_seed(1)
    torch.randn(latents.shape, generator=g)
    offset = 0.5 * torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(diff, offset.expand_as(diff))


def test_caption_dropout_is_seeded():
    caps = [f"c{i}" for i in range(1000)]
    out = drop_captions(caps, 0.1, random.Random(0))
    assert 50 < out.count("") < 150 and out == drop_captions(caps, 0.1, random.Random(0))
    assert drop_captions(caps, 0.0, random.Random(0)) == caps


def test_image_grid_pads_a_short_last_row_with_white():
    from PIL import Image

    ims = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    grid = image_grid(ims, cols=2)
    assert grid.size == (8, 8) and grid.getpixel((5, 1)) == (0, 128, 0) and grid.getpixel((1, 5)) == (0, 0, 255)
    assert grid.getpixel((5, 5)) == (255, 255, 255)
