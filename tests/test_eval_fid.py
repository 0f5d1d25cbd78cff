"""FID (mtn.eval.fid) and the FID Inception-v3 port (mtn.eval.inception): known answers, pytorch-fid compatibility
of names/formats, agreement with torchmetrics, and user-facing errors. Offline: real weights are never downloaded."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mtn.errors import MTNError
from mtn.eval.fid import (
    build_feature_extractor,
    compute_fid,
    feature_stats,
    fid_from_features,
    frechet_distance,
    image_features,
    load_image_folder,
    load_stats,
    reference_stats,
    save_stats,
)
from mtn.eval.inception import FID_WEIGHTS_NAME, BasicConv2d, load_inception


def _gradient_images(n: int, seed: int, shift: float = 0.0, size: int = 32) -> list[Image.Image]:
    """Random linear colour gradients: structured enough that the tiny net's features vary across images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)  # [S, S] each
    out = []
    for _ in range(n):
        c = rng.uniform(0, 1, (3, 3))  # per channel: x slope, y slope, offset
        img = c[:, 0, None, None] * xx + c[:, 1, None, None] * yy + 0.5 * c[:, 2, None, None] + shift  # [3, S, S]
        out.append(Image.fromarray((np.clip(img, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)))
    return out


def _as_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in imgs])  # [N, 3, H, W]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # On a small shared machine, intra-op threads fighting other processes make these CPU forwards ~5x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return build_feature_extractor("tiny", seed=0)


# ---------------------------------------------------------------- Frechet distance: known answers


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(100, 16))  # [N, d], full-rank covariance
    assert abs(fid_from_features(feats, feats)) < 1e-6
    # fewer samples than dims: rank-deficient covariance, still ~0
    few = np.random.default_rng(1).normal(size=(8, 64)) * 0.05
    assert abs(fid_from_features(few, few)) < 1e-6


def test_frechet_distance_matches_the_diagonal_gaussian_formula():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # diagonal covariances commute: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(s1) - sqrt(s2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)  # 8.25 + 5
    assert expected == pytest.approx(13.25)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, abs=1e-6)
    assert frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(got, abs=1e-9)  # symmetric
    # FID is invariant under a common rotation: same answer for non-diagonal covariances
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))  # [3, 3] orthogonal
    rot = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rot == pytest.approx(expected, abs=1e-6)
    # singular covariances (as with fewer images than feature dims) still give the analytic value
    assert frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 0.0])) == pytest.approx(1.0)


def test_fid_grows_with_a_mean_shift():
    feats = np.random.default_rng(0).normal(size=(200, 8))  # [N, d]
    direction = np.ones(8) / np.sqrt(8)  # [d], unit
    values = [fid_from_features(feats, feats + t * direction) for t in (0.0, 0.5, 1.0, 2.0)]
    # same covariance, so FID is exactly the squared shift
    np.testing.assert_allclose(values, [0.0, 0.25, 1.0, 4.0], atol=1e-6)
    assert values == sorted(values)


def test_frechet_distance_rejects_mismatched_dims():
    with pytest.raises(MTNError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- images, folders, stats files


def test_compute_fid_of_an_image_list_with_itself_is_zero(tiny):
    imgs = _gradient_images(80, seed=0)  # more images than the 64 feature dims: full-rank covariance
    assert abs(compute_fid(imgs, imgs, tiny)) < 1e-6
    assert compute_fid(imgs, _gradient_images(80, seed=1, shift=0.3), tiny) > 1e-3


def test_stats_npz_round_trip_equals_the_folder(tiny, tmp_path):
    ref, gen = _gradient_images(70, seed=0), _gradient_images(60, seed=1, shift=0.2)
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, im in enumerate(ref):
        im.save(folder / f"{i:03d}.png")  # lossless, so the folder holds exactly `ref`
    (folder / "notes.txt").write_text("not an image")

    mu, sigma = reference_stats(folder, tiny)
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    save_stats(tmp_path / "stats" / "ref.npz", mu, sigma)
    mu2, sigma2 = load_stats(tmp_path / "stats" / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with np.load(tmp_path / "stats" / "ref.npz") as f:  # pytorch-fid's format: exactly mu and sigma
        assert sorted(f.files) == ["mu", "sigma"]

    via_npz = compute_fid(gen, tmp_path / "stats" / "ref.npz", tiny)
    via_folder = compute_fid(gen, str(folder), tiny)
    via_list = compute_fid(gen, ref, tiny)
    # the value, by the formula with another route to the trace: Tr sqrt(S1 S2) = sum sqrt(eig(S1 S2))
    fg, fr = image_features(tiny, gen), image_features(tiny, ref)  # [60, 64], [70, 64]
    s1, s2 = np.cov(fg, rowvar=False), np.cov(fr, rowvar=False)  # [64, 64] each
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    expected = ((fg.mean(0) - fr.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert expected > 1e-2 and via_npz == pytest.approx(expected, rel=1e-4)
    assert via_npz == pytest.approx(via_folder, abs=1e-9)
    assert via_npz == pytest.approx(via_list, abs=1e-9)


def test_image_features_accepts_tensors_modes_and_mixed_sizes(tiny):
    imgs = _gradient_images(5, seed=0)
    feats = image_features(tiny, imgs, batch_size=2)  # uneven last batch
    assert feats.shape == (5, 64) and feats.dtype == np.float64
    tensor = _as_tensor(imgs)  # [5, 3, H, W]
    np.testing.assert_allclose(image_features(tiny, tensor), feats, atol=1e-6)
    mixed = [imgs[0], imgs[1].resize((48, 40)), imgs[2].convert("L"), imgs[3].convert("RGBA")]
    assert image_features(tiny, mixed, progress=True).shape == (4, 64)
    with pytest.raises(MTNError, match=r"\[0, 1\]"):
        image_features(tiny, tensor * 255)


def test_load_image_folder_sorts_filters_and_limits(tmp_path):
    imgs = _gradient_images(3, seed=0, size=8)
    imgs[0].save(tmp_path / "b.JPG")
    imgs[1].convert("L").save(tmp_path / "a.png")
    imgs[2].save(tmp_path / "c.bmp")
    (tmp_path / "d.txt").write_text("x")
    loaded = load_image_folder(tmp_path)
    assert len(loaded) == 3 and all(im.mode == "RGB" for im in loaded)
    assert np.array_equal(np.asarray(loaded[2]), np.asarray(imgs[2]))  # a < b < c; bmp is lossless
    assert len(load_image_folder(tmp_path, limit=2)) == 2


# ---------------------------------------------------------------- agreement with torchmetrics


class _TorchmetricsFeatures(nn.Module):
    """torchmetrics hands a custom feature module the images untouched (with normalize=True: our float [0, 1]
    tensors; its uint8 conversion applies only to its own Inception) and casts the output to float64 itself."""

    num_features = 64  # declared, so torchmetrics skips its dummy forward

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)  # [N, 64]


def test_fid_agrees_with_torchmetrics(tiny):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _as_tensor(_gradient_images(90, seed=0)), _as_tensor(_gradient_images(70, seed=1, shift=0.2))
    metric = FrechetInceptionDistance(feature=_TorchmetricsFeatures(tiny), normalize=True)
    for chunk in real.split(32):  # its running sums must match our one-shot statistics
        metric.update(chunk, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    ours = compute_fid(fake, real, tiny)
    assert ours > 0.1
    assert ours == pytest.approx(theirs, rel=1e-5)  # measured: ~1e-9 (theirs is float32)


# ---------------------------------------------------------------- FID Inception-v3


@pytest.fixture(scope="module")
def inception():
    """Random-init FID Inception with its features of 2 small images (one forward: ~seconds on CPU)."""
    model = load_inception(None, seed=0)
    x = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(0))  # [2, 3, H, W], resized to 299
    with torch.no_grad():
        feats = model(x)  # [2, 2048]
    return model, x, feats


def test_random_inception_gives_finite_pool3_features(inception):
    model, _, feats = inception
    assert feats.shape == (2, 2048)
    # pool3 = the average pool of Mixed_7c's ReLU outputs: non-negative, mostly non-zero, and the two images differ
    assert torch.isfinite(feats).all() and (feats >= 0).all() and (feats > 0).float().mean() > 0.5
    assert (feats[0] - feats[1]).abs().max() > 1e-3 * feats.abs().max()
    assert model.pretrained is False and not model.training


def test_inception_state_dict_has_pytorch_fid_names(inception):
    model, _, _ = inception
    sd = model.state_dict()
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_mean": (32,),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in sd)  # pytorch-fid builds Inception3 with aux_logits=False
    # Expected count, from torchvision's Inception3 + pytorch-fid's patches: BasicConv2d modules = stem 5
    # (1a, 2a, 2b, 3b, 4a) + 3 InceptionA x 7 + InceptionB 4 + 4 InceptionC x 10 + InceptionD 6 + 2 InceptionE x 9
    # = 94; each holds conv.weight + bn.{weight, bias, running_mean, running_var, num_batches_tracked} = 6 tensors;
    # plus fc.weight and fc.bias. (The pools, avgpool and dropout hold no tensors.)
    assert sum(isinstance(m, BasicConv2d) for m in model.modules()) == 94
    assert len(sd) == 94 * 6 + 2 == 566
    assert len(list(model.parameters())) == 94 * 3 + 2


def test_inception_weights_round_trip_pth_and_safetensors(inception, tmp_path):
    from safetensors.torch import save_file

    model, x, feats = inception
    sd = model.state_dict()
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = load_inception(tmp_path / name)
        assert loaded.pretrained is True and not loaded.training
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
        with torch.no_grad():
            assert torch.equal(loaded(x), feats), name  # [2, 2048], same weights and batch -> identical

    ext = build_feature_extractor(f"inception:{tmp_path / 'w.pth'}")
    assert ext.pretrained is True and ext.dim == 2048 and str(tmp_path / "w.pth") in ext.description


def test_inception_loads_files_without_num_batches_tracked(inception, tmp_path):
    # files saved before torch 0.4.1 lack these buffers; BatchNorm fills them in and strict loading still passes
    model, _, _ = inception
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 94 * 5 + 2
    torch.save(sd, tmp_path / "old.pth")
    loaded = load_inception(tmp_path / "old.pth")
    assert torch.equal(loaded.state_dict()["Mixed_7c.branch_pool.conv.weight"], sd["Mixed_7c.branch_pool.conv.weight"])


def test_inception_weight_errors(inception, tmp_path):
    model, _, _ = inception
    sd = model.state_dict()
    sd["Mixed_5b.branch1x1.conv.kernel"] = sd.pop("Mixed_5b.branch1x1.conv.weight")
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(MTNError, match="Mixed_5b.branch1x1.conv.weight") as err:
        load_inception(tmp_path / "renamed.pth")
    assert "Mixed_5b.branch1x1.conv.kernel" in str(err.value) and FID_WEIGHTS_NAME in str(err.value)

    sd = model.state_dict()  # a 1000-class head (torchvision-style) does not fit pytorch-fid's 1008 classes
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(sd, tmp_path / "head1000.pth")
    with pytest.raises(MTNError, match="do not fit"):
        load_inception(tmp_path / "head1000.pth")

    with pytest.raises(MTNError, match="not found.*pt_inception-2015-12-05-6726825d"):
        load_inception(tmp_path / "missing.pth")
    with pytest.raises(MTNError, match="not found"):
        build_feature_extractor(f"inception:{tmp_path / 'missing.pth'}")

    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "pickle.pth")  # arbitrary object: never unpickled
    with pytest.raises(MTNError, match="could not read"):
        load_inception(tmp_path / "pickle.pth")
    torch.save({"state_dict": {"fc.bias": torch.zeros(1008)}}, tmp_path / "nested.pth")
    with pytest.raises(MTNError, match="not a plain state dict"):
        load_inception(tmp_path / "nested.pth")


def test_random_inception_extractor_is_labelled_smoke_only():
    ext = build_feature_extractor("inception", seed=1)
    assert ext.pretrained is False and ext.dim == 2048 and "RANDOM" in ext.description


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_mtn_errors(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MTNError, match="no images"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(MTNError, match="no images"):
        compute_fid(_gradient_images(4, seed=0), tmp_path / "empty", tiny)
    with pytest.raises(MTNError, match="not found"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(MTNError, match="at least 2"):
        compute_fid(_gradient_images(1, seed=0), _gradient_images(4, seed=1), tiny)
    with pytest.raises(MTNError, match="at least 2"):
        feature_stats(np.zeros((1, 64)))
    with pytest.raises(MTNError, match=r"unknown FID feature extractor 'vgg'.*inception:.*tiny"):
        build_feature_extractor("vgg")
    with pytest.raises(MTNError, match="must end in .npz"):
        save_stats(tmp_path / "stats.npy", np.zeros(2), np.eye(2))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(2))
    with pytest.raises(MTNError, match="missing"):
        load_stats(tmp_path / "bad.npz")
    save_stats(tmp_path / "ok.npz", np.zeros(3), np.eye(3))
    with pytest.raises(MTNError, match="3-d stats"):
        compute_fid(_gradient_images(4, seed=0), tmp_path / "ok.npz", tiny)
