"""Frozen text encoders (mtn.encoders) over the tiny seeded builders (mtn.tiny); no files, no network."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mtn.encoders import FrozenTextEncoder, load_text_encoder
from mtn.errors import MTNError
from mtn.tiny import TINY_HIDDEN_SIZES, TINY_KINDS
from mtn.tiny.captions import TINY_CORPUS, generate_captions
from mtn.tiny.encoders import build_tiny_encoder

L = 16
SHORT = "a red dog"
LONG = "a black cat sleeps on the sofa while two children play in the park next to the old house " * 3
TEXTS = [SHORT, LONG, "ein roter Hund läuft am Strand"]

_cache: dict[str, FrozenTextEncoder] = {}


def tiny(kind: str) -> FrozenTextEncoder:
    if kind not in _cache:
        _cache[kind] = load_text_encoder(f"tiny:{kind}", max_length=L)
    return _cache[kind]


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_shapes_mask_and_truncation(kind):
    enc = tiny(kind)
    hidden, mask = enc(TEXTS)
    d = TINY_HIDDEN_SIZES[kind]
    assert enc.hidden_size == d
    assert hidden.shape == (3, L, d)  # [B, max_length, d]
    assert mask.shape == (3, L)  # [B, max_length]
    assert hidden.dtype == torch.float32 and not hidden.requires_grad
    assert torch.isfinite(hidden).all()
    # Mask counts the real tokens (specials included): right padding, ones then zeros.
    for text, row in zip(TEXTS, mask, strict=True):
        n = len(enc.tokenizer(text, truncation=True, max_length=L)["input_ids"])
        assert int(row.sum()) == n
        assert row[:n].eq(1).all() and row[n:].eq(0).all()
    assert mask[0].sum() < mask[1].sum()
    assert int(mask[1].sum()) == L  # the long text is truncated at max_length


def test_hidden_sizes_differ_on_purpose():
    assert TINY_HIDDEN_SIZES == {"t5": 32, "clip": 48, "bert": 40, "xlmr": 40}


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_deterministic_builds(kind):
    a = load_text_encoder(f"tiny:{kind}", max_length=L)
    hidden_a, mask_a = a(TEXTS)
    hidden_b, mask_b = tiny(kind)(TEXTS)
    assert a.tokenizer.get_vocab() == tiny(kind).tokenizer.get_vocab()
    assert torch.equal(hidden_a, hidden_b) and torch.equal(mask_a, mask_b)
    other = load_text_encoder(f"tiny:{kind}", max_length=L, seed=1)
    assert not torch.allclose(other(TEXTS)[0], hidden_a)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_prefix_changes_output(kind):
    enc = FrozenTextEncoder(tiny(kind).model, tiny(kind).tokenizer, f"tiny:{kind}", L, prefix="query: ")
    plain, _ = tiny(kind)([SHORT])
    prefixed, mask = enc([SHORT])
    assert not torch.allclose(plain, prefixed)
    assert mask.sum() > tiny(kind)([SHORT])[1].sum()
    assert enc.spec()["prefix"] == "query: "


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_save_and_reload_from_local_path(kind, tmp_path):
    enc = tiny(kind)
    enc.save(tmp_path)
    back = load_text_encoder(str(tmp_path), max_length=L)
    hidden, mask = enc(TEXTS)
    hidden2, mask2 = back(TEXTS)
    assert torch.equal(mask, mask2)
    assert torch.equal(hidden, hidden2)
    spec, spec2 = enc.spec(), back.spec()
    assert spec2["name_or_path"] == str(tmp_path)
    assert (spec2["model_type"], spec2["hidden_size"]) == (spec["model_type"], spec["hidden_size"])


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_spec_is_json_and_rebuilds(kind):
    spec = tiny(kind).spec()
    assert set(spec) == {"name_or_path", "subfolder", "hub_revision", "max_length", "prefix", "model_type",
                         "hidden_size"}
    spec = json.loads(json.dumps(spec))
    again = load_text_encoder(
        spec["name_or_path"], spec["max_length"], prefix=spec["prefix"], subfolder=spec["subfolder"],
        revision=spec["hub_revision"],
    )
    assert torch.equal(again([SHORT])[0], tiny(kind)([SHORT])[0])


def test_frozen_and_stays_eval():
    enc = tiny("bert")
    assert not any(p.requires_grad for p in enc.parameters())
    parent = torch.nn.ModuleDict({"enc": enc}).train()
    assert parent.training and not enc.model.training
    enc.eval()


def test_bad_texts_raise_mtn_error():
    enc = tiny("t5")
    with pytest.raises(MTNError, match="empty"):
        enc([])
    with pytest.raises(MTNError, match="strings"):
        enc(["ok", 3])
    with pytest.raises(MTNError, match="list"):
        enc("a plain string")


@pytest.mark.parametrize("path", ["./does/not/exist", "does/not/exist", "/nonexistent/model/dir"])
def test_missing_local_path_raises_mtn_error(path):
    with pytest.raises(MTNError, match="does not exist"):
        load_text_encoder(path, max_length=L)


def test_bad_options_raise_mtn_error():
    with pytest.raises(MTNError, match="tiny:nope"):
        load_text_encoder("tiny:nope", max_length=L)
    with pytest.raises(MTNError, match="exceeds"):
        load_text_encoder("tiny:clip", max_length=78)
    with pytest.raises(MTNError, match="dtype"):
        load_text_encoder("tiny:t5", max_length=L, dtype="float8")
    with pytest.raises(MTNError, match="max_length"):
        load_text_encoder("tiny:t5", max_length=0)


def test_dtype_option():
    enc = load_text_encoder("tiny:bert", max_length=8, dtype="bfloat16")
    hidden, _ = enc([SHORT])
    assert enc.dtype == hidden.dtype == torch.bfloat16


def test_ldmbert_subfolder_with_tokenizer_folder(tmp_path):
    """The CompVis/ldm-text2im-large-256 layout: model in bert/, tokenizer in tokenizer/, no mask passed."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    _, tok = build_tiny_encoder("bert")
    torch.manual_seed(0)
    cfg = LDMBertConfig(
        vocab_size=len(tok),
        max_position_embeddings=77,
        encoder_layers=1,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        head_dim=8,
        d_model=16,
    )
    model = LDMBertModel(cfg).eval()
    model.save_pretrained(os.path.join(tmp_path, "bert"))
    tok.save_pretrained(os.path.join(tmp_path, "tokenizer"))
    enc = load_text_encoder(str(tmp_path), max_length=12, subfolder="bert")
    hidden, mask = enc([SHORT])
    assert hidden.shape == (1, 12, 16) and enc.spec()["model_type"] == "ldmbert"
    ids = tok([SHORT], padding="max_length", max_length=12, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids)[0]  # exactly how LDMTextToImagePipeline calls it
    torch.testing.assert_close(hidden, ref)
    # no mask reaches LDM-BERT, so zero_pad must still run the full length to keep real tokens exact
    fast, fast_mask = enc([SHORT, LONG[:20]], zero_pad=True)
    m = fast_mask.bool()
    torch.testing.assert_close(fast[0][m[0]], ref[0][m[0]])
    assert fast[~m].abs().max() == 0


def test_generate_captions_and_corpus():
    caps = generate_captions(50, seed=3)
    assert len(caps) == 50 and caps == generate_captions(50, seed=3)
    assert caps != generate_captions(50, seed=4)
    assert all(isinstance(c, str) and c.startswith("a ") for c in caps)
    assert generate_captions(0) == []
    assert len(TINY_CORPUS) >= 90


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_zero_pad_is_exact_on_real_tokens(kind):
    enc = tiny(kind)
    texts = [SHORT, "ein roter Hund läuft am Strand"]  # both shorter than L: the batch runs at its longest
    full, mask = enc(texts)
    fast, fast_mask = enc(texts, zero_pad=True)
    assert fast.shape == full.shape and torch.equal(fast_mask, mask)
    m = mask.bool()
    torch.testing.assert_close(fast[m], full[m], atol=1e-5, rtol=1e-4)
    assert fast[~m].abs().max() == 0
