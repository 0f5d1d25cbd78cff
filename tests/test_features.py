"""Feature cache format (round trip, mismatch refusal) and the closed-form baselines."""

import json

import pytest
import torch

from mtn.baselines import LinearTranslationMap, PooledLinearMap, fit_linear_map, fit_pooled_linear, predict
from mtn.config import load_config
from mtn.data import load_pairs
from mtn.data.features import (
    check_cache,
    encode_rows,
    expected_record,
    load_features,
    write_feature_manifest,
    write_shard,
)
from mtn.encoders import load_text_encoder
from mtn.errors import MTNError

CFG = {"source_encoder": "tiny:t5", "source_max_length": 96, "target_encoder": "tiny:clip",
       "target_max_length": 77, "corpus": "generated:40"}


@pytest.fixture(scope="module")
def tiny_rows():
    cfg = load_config(None, CFG)
    pairs = load_pairs(corpus=cfg.corpus)
    source = load_text_encoder(cfg.source_encoder, cfg.source_max_length)
    target = load_text_encoder(cfg.target_encoder, cfg.target_max_length)
    return cfg, pairs, encode_rows(source, target, pairs, full_target=True, batch_size=16)


def write_cache(url, cfg, pairs, rows):
    """Two shards written out of corpus order, as parallel writers would."""
    shards = []
    for lo, hi in ((25, 40), (0, 25)):
        part = {k: v[lo:hi] for k, v in rows.items()}
        shards.append(write_shard(url, {"index": torch.arange(lo, hi), **part}, torch.float16, generation="gen-t"))
    dims = {"source_len": cfg.source_max_length, "target_len": cfg.target_max_length,
            "source_dim": rows["source"].shape[-1], "target_dim": rows["target"].shape[-1]}
    return write_feature_manifest(url, expected_record(cfg, pairs, [cfg.corpus]), shards, dims, "float16")


def test_cache_round_trip_equals_direct_forward(tmp_path, tiny_rows):
    cfg, pairs, rows = tiny_rows
    manifest = write_cache(str(tmp_path / "c"), cfg, pairs, rows)
    assert manifest["num_rows"] == 40 and [s["file"] for s in manifest["shards"]] == [
        "gen-t/shard-00000000.safetensors", "gen-t/shard-00000025.safetensors"]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    checked = check_cache(str(tmp_path / "c"), expected_record(cfg, pairs, [cfg.corpus]))
    got = load_features(str(tmp_path / "c"), checked)
    for k in ("source_mask", "target_mask"):
        assert torch.equal(got[k].long(), rows[k])
    for k in ("source", "target"):  # fp16 storage: relative tolerance of half precision
        assert got[k].shape == rows[k].shape and got[k].dtype == torch.float16
        torch.testing.assert_close(got[k].float(), rows[k], rtol=2e-3, atol=2e-3)
    assert (rows["source_mask"] == 0).any() and got["source"][rows["source_mask"] == 0].abs().max() == 0  # trimmed source padding comes back as zeros
    assert load_features(str(tmp_path / "c"), rows=7)["target"].shape[0] == 7


def test_zero_padded_target_is_trimmed_and_restored(tmp_path, tiny_rows):
    cfg, pairs, rows = tiny_rows
    zero = {**rows, "target": rows["target"] * rows["target_mask"].unsqueeze(-1)}  # cache_target_padding=false
    entry = write_shard(str(tmp_path / "z"), {"index": torch.arange(40), **zero}, torch.float16, trim_target=True)
    dims = {"source_len": 96, "target_len": 77, "source_dim": zero["source"].shape[-1], "target_dim": 48}
    write_feature_manifest(str(tmp_path / "z"), expected_record(cfg, pairs, [cfg.corpus]), [entry], dims, "float16",
                   extra={"target_zero_padded": True})
    got = load_features(str(tmp_path / "z"))
    assert got["target"].shape == (40, 77, 48)
    torch.testing.assert_close(got["target"].float(), zero["target"], rtol=2e-3, atol=2e-3)
    with pytest.raises(MTNError, match="zero-padded the target"):  # a loss over every position needs the padding
        check_cache(str(tmp_path / "z"), expected_record(cfg, pairs, [cfg.corpus]), needs_target_padding=True)


def test_mismatched_or_incomplete_cache_is_refused(tmp_path, tiny_rows):
    cfg, pairs, rows = tiny_rows
    url = str(tmp_path / "c")
    write_cache(url, cfg, pairs, rows)
    other_len = load_config(None, {**CFG, "target_max_length": 64})
    with pytest.raises(MTNError, match=r"target_encoder.max_length: cache has 77, config wants 64"):
        check_cache(url, expected_record(other_len, pairs, [cfg.corpus]))
    other_enc = load_config(None, {**CFG, "source_encoder": "tiny:bert"})
    with pytest.raises(MTNError, match=r"source_encoder.name_or_path: cache has 'tiny:t5'"):
        check_cache(url, expected_record(other_enc, pairs, [cfg.corpus]))
    edited = [pairs[0], ("another caption", "another caption"), *pairs[2:]]
    with pytest.raises(MTNError, match=r"corpus.sha256"):
        check_cache(url, expected_record(cfg, edited, [cfg.corpus]))
    with pytest.raises(MTNError, match=r"corpus.num_pairs: cache has 40"):
        check_cache(url, expected_record(cfg, pairs[:30], [cfg.corpus]))
    # a shard gone missing, an extraction that never wrote its manifest, a foreign manifest
    (tmp_path / "c" / "gen-t" / "shard-00000025.safetensors").unlink()
    with pytest.raises(MTNError, match="shard-00000025.safetensors listed in the manifest is missing"):
        load_features(url)
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(MTNError, match="incomplete extraction"):
        check_cache(url, expected_record(cfg, pairs, [cfg.corpus]))
    with pytest.raises(MTNError, match="not found"):
        load_features(str(tmp_path / "nowhere"))
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(MTNError, match="unknown format"):
        load_features(url)


def test_encoder_revision_is_a_content_hash(tmp_path):
    from mtn.data.features import encoder_revision

    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"weights-1")
    first = encoder_revision(str(tmp_path / "enc"))
    (tmp_path / "enc2").mkdir()
    (tmp_path / "enc2" / "config.json").write_text("{}")
    (tmp_path / "enc2" / "model.safetensors").write_bytes(b"weights-2")
    assert first.startswith("sha256:") and first != encoder_revision(str(tmp_path / "enc2"))


def synthetic(n=300, s_len=6, t_len=5, d_s=8, d_t=7, seed=0):
    """Rows whose target is exactly linear in the source: Y = P (X W) + B on valid source tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, s_len, d_s, generator=g)
    lengths = torch.randint(2, s_len + 1, (n,), generator=g)
    xm = (torch.arange(s_len) < lengths[:, None]).long()  # [n, S_s]
    x = x * xm.unsqueeze(-1)
    W, P, B = torch.randn(d_s, d_t, generator=g), torch.randn(t_len, s_len, generator=g), torch.randn(t_len, d_t, generator=g)
    y = torch.einsum("ts,bsd->btd", P, x @ W) + B
    return {"source": x, "source_mask": xm, "target": y, "target_mask": torch.ones(n, t_len, dtype=torch.long)}


def test_linear_map_recovers_a_linear_relation_and_round_trips(tmp_path):
    rows = synthetic()
    model = fit_linear_map(rows, alpha=1e-8, iters=30)
    err = ((predict(model, rows) - rows["target"]) ** 2).mean() / rows["target"].var()
    assert err < 1e-3, err  # ALS converges to the exact map (up to the W/P scale ambiguity)
    model.save_pretrained(tmp_path / "lin")
    again = LinearTranslationMap.from_pretrained(tmp_path / "lin")
    assert torch.equal(predict(again, rows), predict(model, rows))


def test_pooled_linear_fits_pooled_targets():
    rows = synthetic(d_s=6, d_t=6)
    model = fit_pooled_linear(rows, alpha=1e-8)
    pred = predict(model, rows)  # [N, S_t, d_t]: one vector repeated over positions
    assert pred.shape == rows["target"].shape and torch.equal(pred[:, 0], pred[:, -1])
    assert isinstance(model, PooledLinearMap)
    # least squares on pooled features: better than predicting the mean pooled target
    pooled_true = rows["target"].mean(1)
    assert ((pred[:, 0] - pooled_true) ** 2).mean() < ((pooled_true - pooled_true.mean(0)) ** 2).mean()


def test_translator_folder_holds_a_baseline(tmp_path):
    from mtn.translator import load_translator, save_translator_folder

    source = load_text_encoder("tiny:t5", 24)
    model = LinearTranslationMap(source.hidden_size, 48, 24, 77)
    save_translator_folder(tmp_path / "tr", model, {"source_encoder": source.spec(),
                                                    "target_encoder": {"name_or_path": "tiny:clip", "max_length": 77}})
    tr = load_translator(tmp_path / "tr")
    assert isinstance(tr.mtn, LinearTranslationMap) and tr.encode(["a dog", ""]).shape == (2, 77, 48)
    manifest = json.loads((tmp_path / "tr" / "translator.json").read_text())
    manifest["model_class"] = "Nope"
    (tmp_path / "tr" / "translator.json").write_text(json.dumps(manifest))
    with pytest.raises(MTNError, match="unknown model_class 'Nope'"):
        load_translator(tmp_path / "tr")
