import pytest
import torch

from mtn.errors import MTNError
from mtn.model import ModelTranslationNetwork, TokenDiscriminator


def tiny_mtn(**kw):
    torch.manual_seed(0)
    args = dict(source_dim=24, target_dim=16, source_len=12, target_len=10, num_modules=2, hidden_dim=32)
    return ModelTranslationNetwork(**{**args, **kw})


@pytest.mark.parametrize("s_s,d_s,s_t,d_t", [(12, 24, 10, 16), (256, 32, 77, 48), (128, 16, 77, 40), (77, 8, 77, 8),
                                             (8, 20, 16, 12)])
def test_shapes(s_s, d_s, s_t, d_t):
    mtn = tiny_mtn(source_dim=d_s, target_dim=d_t, source_len=s_s, target_len=s_t)
    x = torch.randn(3, s_s, d_s)
    y = mtn.encode(x, torch.ones(3, s_s))
    assert y.shape == (3, s_t, d_t)
    assert mtn.decode(y).shape == (3, s_s, d_s)


def test_padded_positions_do_not_change_output():
    mtn = tiny_mtn().eval()
    x = torch.randn(2, 12, 24)
    mask = torch.ones(2, 12)
    mask[0, 5:] = 0
    mask[1, 9:] = 0
    x2 = x.clone()
    x2[0, 5:] = 100 * torch.randn(7, 24)  # garbage in padding
    x2[1, 9:] = -3.0
    y1, y2 = mtn.encode(x, mask), mtn.encode(x2, mask)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    # and real positions do matter
    x3 = x.clone()
    x3[0, 0] += 1.0
    assert not torch.allclose(mtn.encode(x3, mask)[0], y1[0])


def test_save_load_round_trip(tmp_path):
    mtn = tiny_mtn()
    mtn.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ModelTranslationNetwork.from_pretrained(tmp_path / "m")
    assert loaded.config.source_len == 12 and loaded.config.num_modules == 2
    x, m = torch.randn(2, 12, 24), torch.ones(2, 12)
    torch.testing.assert_close(loaded.encode(x, m), mtn.encode(x, m))
    torch.testing.assert_close(loaded.decode(torch.ones(1, 10, 16)), mtn.decode(torch.ones(1, 10, 16)))


def test_named_sizes_and_errors():
    three = ModelTranslationNetwork.from_named_size("mtn-3rm", source_dim=8, target_dim=8, source_len=4, target_len=4)
    five = ModelTranslationNetwork.from_named_size("mtn-5rm", source_dim=8, target_dim=8, source_len=4, target_len=4)
    assert three.config.num_modules == 3 and five.config.num_modules == 5
    with pytest.raises(MTNError, match="unknown MTN size"):
        ModelTranslationNetwork.from_named_size("mtn-4rm", source_dim=8, target_dim=8)
    with pytest.raises(MTNError, match=r"shape \[B, 12, 24\]"):
        tiny_mtn().encode(torch.randn(1, 11, 24))
    with pytest.raises(MTNError, match="with_decoder=False"):
        tiny_mtn(with_decoder=False).decode(torch.randn(1, 10, 16))


def test_param_counts_at_paper_dims(capsys):
    """T5-3B (d=1024) -> LDM-BERT (d=1280), 77 tokens; paper Table: MTN-3RM 34M, MTN-5RM 51M (encoder M)."""
    counts = {}
    with torch.device("meta"):  # no memory for 2 x 85M params
        for size, paper in (("mtn-3rm", 34e6), ("mtn-5rm", 51e6)):
            mtn = ModelTranslationNetwork.from_named_size(size, source_dim=1024, target_dim=1280, source_len=77,
                                                          target_len=77)
            counts[size] = mtn.num_parameters_of("encoder")
            with capsys.disabled():  # shown in the test log on purpose
                print(f"\n{size}: encoder {counts[size] / 1e6:.1f}M params (paper {paper / 1e6:.0f}M), "
                      f"decoder {mtn.num_parameters_of('decoder') / 1e6:.1f}M")
            assert abs(counts[size] - paper) / paper < 0.03
    assert counts["mtn-5rm"] > counts["mtn-3rm"]


def test_discriminator_tokenwise():
    torch.manual_seed(0)
    d = TokenDiscriminator(16, hidden_dim=8)
    assert d(torch.randn(3, 10, 16)).shape == (3, 10)


def test_target_stats_start_at_the_mean_target_and_round_trip(tmp_path):
    torch.manual_seed(0)
    target = torch.randn(64, 5, 4) * torch.arange(1, 6).view(1, 5, 1) + 3.0  # [N, S_t, d_t], per-position scale
    mask = torch.ones(64, 5)
    mask[:, -1] = 0  # the last position never holds a real token
    mtn = ModelTranslationNetwork(source_dim=6, target_dim=4, source_len=3, target_len=5, num_modules=1,
                                  target_stats=True)
    mtn.set_target_stats(target, mask)
    torch.testing.assert_close(mtn.target_shift[:4], target[:, :4].mean(0))
    assert mtn.target_scale[0, 0] < mtn.target_scale[3, 0]  # spread grows with the position here
    mtn.save_pretrained(tmp_path / "m")
    again = ModelTranslationNetwork.from_pretrained(tmp_path / "m")
    src = torch.randn(2, 3, 6)
    assert torch.equal(again.encode(src), mtn.encode(src))
    assert torch.equal(again.target_shift, mtn.target_shift)


def test_linear_skip_starts_exactly_at_the_linear_map():
    from mtn.baselines import LinearTranslationMap

    torch.manual_seed(0)
    lin = LinearTranslationMap(6, 4, 3, 5)
    for p in lin.parameters():
        p.data.normal_()
    mtn = ModelTranslationNetwork(source_dim=6, target_dim=4, source_len=3, target_len=5, num_modules=1,
                                  linear_skip=True)
    mtn.init_linear_skip(lin)
    src, mask = torch.randn(2, 3, 6), torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(mtn.encode(src, mask), lin.encode(src, mask))  # gate 0: the body is off
    mtn.encode(src, mask).pow(2).sum().backward()
    assert mtn.skip_out.weight.grad.abs().sum() > 0  # ... but its output layer learns, so the body joins in
    with pytest.raises(MTNError, match="exclusive"):
        ModelTranslationNetwork(source_dim=6, target_dim=4, source_len=3, target_len=5, target_stats=True,
                                linear_skip=True)


def mixer_mtn(**kw):
    torch.manual_seed(0)
    args = dict(source_dim=24, target_dim=16, source_len=12, target_len=10, num_modules=2, block_layout="mixer",
                decoder_modules=1, standardize=True)
    return ModelTranslationNetwork(**{**args, **kw})


def test_mixer_layout_shapes_mask_invariance_and_block_count():
    mtn = mixer_mtn().eval()
    assert len(mtn.encoder.blocks) == 2 and len(mtn.decoder.blocks) == 1
    x, mask = torch.randn(2, 12, 24), torch.ones(2, 12)
    mask[0, 4:] = 0
    y = mtn.encode(x, mask)
    assert y.shape == (2, 10, 16) and mtn.decode(y).shape == (2, 12, 24)
    x2 = x.clone()
    x2[0, 4:] = 50.0  # garbage in padding changes nothing
    torch.testing.assert_close(mtn.encode(x2, mask), y, rtol=0, atol=0)
    with pytest.raises(MTNError, match="block_layout"):
        mixer_mtn(block_layout="transformer")
    with pytest.raises(MTNError, match="standardize replaces"):
        mixer_mtn(target_stats=True)


def test_feature_stats_over_valid_tokens_and_raw_units_round_trip(tmp_path):
    torch.manual_seed(0)
    rows = {"source": torch.randn(40, 12, 24) * 3 + 5, "source_mask": torch.ones(40, 12),
            "target": torch.randn(40, 10, 16) * 0.5 - 2, "target_mask": torch.ones(40, 10)}
    rows["source_mask"][:, 6:] = 0
    rows["source"][:, 6:] = 1e4  # padding must not enter the statistics
    mtn = mixer_mtn()
    mtn.set_feature_stats(rows)
    valid = rows["source"][:, :6].reshape(-1, 24)
    torch.testing.assert_close(mtn.source_mean, valid.mean(0))
    torch.testing.assert_close(mtn.source_std, valid.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mtn.target_mean, rows["target"].reshape(-1, 16).mean(0))
    y = rows["target"][:2]
    torch.testing.assert_close(mtn.denormalize(mtn.normalize(y, "target"), "target"), y)
    assert mtn.normalize(y, "target").std() == pytest.approx(1.0, abs=0.2)
    mtn.save_pretrained(tmp_path / "m")  # the statistics travel with the weights
    again = ModelTranslationNetwork.from_pretrained(tmp_path / "m")
    assert again.config.block_layout == "mixer" and again.config.standardize
    torch.testing.assert_close(again.source_std, mtn.source_std)
    x, m = rows["source"][:3], rows["source_mask"][:3]
    torch.testing.assert_close(again.encode(x, m), mtn.encode(x, m))


def test_folders_saved_before_block_layout_still_load(tmp_path):
    import json

    old = tiny_mtn()
    old.save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for key in ("block_layout", "decoder_modules", "standardize"):  # what an older mtn wrote
        cfg.pop(key)
    cfg_file.write_text(json.dumps(cfg))
    loaded = ModelTranslationNetwork.from_pretrained(tmp_path / "m")
    assert loaded.config.block_layout == "gluegen" and not loaded.config.standardize
    x, m = torch.randn(2, 12, 24), torch.ones(2, 12)
    torch.testing.assert_close(loaded.encode(x, m), old.encode(x, m))
