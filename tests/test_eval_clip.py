"""CLIP score, its torchmetrics cross-check and the multilingual (M-CLIP style) variant, on seeded toy models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mtn.errors import MTNError
from mtn.eval import clip as C
from mtn.tiny import clip as T
from mtn.tiny.captions import TINY_CORPUS
from mtn.tiny.encoders import build_tiny_encoder

CAPTIONS = ["a red dog runs on the beach", "ein hund schwimmt im see", "un chat noir dort sur le canapé", "a boat"]
LONG = " ".join(["a small boat sails on a calm lake"] * 15)  # ~120 CLIP tokens, over the 77-token limit


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Odd, non-square sizes so resize + center crop really run.
    return [Image.fromarray(rng.integers(0, 256, (37 + 5 * i, 45, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("clip-cache")


@pytest.fixture(scope="module")
def clip_path(cache) -> str:
    return C.resolve_clip("tiny:clip-vit", cache)


@pytest.fixture(scope="module")
def mclip_path(cache, clip_path) -> str:
    return C.resolve_mclip("tiny:mclip", cache, clip_path)


# --------------------------------------------------------------------------- the formula


def test_identical_embeddings_score_the_maximum():
    e = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    assert C.clip_score_from_embeddings(e, e) == 100.0
    assert C.clip_score_from_embeddings(e, 3.5 * e) == pytest.approx(100.0, abs=1e-9)  # cosine ignores scale


def test_orthogonal_and_opposite_embeddings_score_zero():
    eye = torch.eye(4)
    assert C.clip_score_from_embeddings(eye, eye.roll(1, dims=0)) == 0.0
    e = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert C.clip_score_from_embeddings(e, -e) == 0.0  # cos = -1 clamps to 0, per pair


def test_mixed_pairs_give_the_hand_computed_mean():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [4.0, 3.0]])
    # cos: 1, 0, -1 (-> 0), 1/sqrt(2), 24/25
    expected = (100 + 0 + 0 + 100 / math.sqrt(2) + 96) / 5
    assert C.clip_score_from_embeddings(image, text) == pytest.approx(expected, abs=1e-9)
    assert C.clip_pair_scores(image, text).tolist() == pytest.approx([100, 0, 0, 100 / math.sqrt(2), 96], abs=1e-9)


def test_bad_embedding_shapes_are_user_errors():
    with pytest.raises(MTNError, match="one shape"):
        C.clip_score_from_embeddings(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(MTNError, match="no image/caption pairs"):
        C.clip_score_from_embeddings(torch.zeros(0, 4), torch.zeros(0, 4))


# --------------------------------------------------------------------------- tiny CLIP vs torchmetrics


def test_clip_score_matches_torchmetrics(clip_path):
    images, texts = _images(5), [*CAPTIONS, LONG]
    image, text = C.clip_image_embeds(images, clip_path), C.clip_text_embeds(texts, clip_path)
    assert image.shape == text.shape == (5, 32)
    ours = C.clip_score(images, texts, clip_path, batch_size=2)
    assert ours == pytest.approx(C.clip_score_from_embeddings(image, text), abs=1e-4)  # batch 2 vs 16: fp32 noise
    # torchmetrics on one pair = that pair's clamped score; on all pairs = max(mean(100 cos), 0).
    per_pair = [C.clip_score_torchmetrics([im], [t], clip_path) for im, t in zip(images, texts, strict=True)]
    assert per_pair == pytest.approx(C.clip_pair_scores(image, text).tolist(), abs=1e-4)
    cos = torch.nn.functional.cosine_similarity(image, text)  # [5]
    expected = max(100 * cos.mean().item(), 0.0)
    assert C.clip_score_torchmetrics(images, texts, clip_path, batch_size=2) == pytest.approx(expected, abs=1e-4)


def test_long_caption_is_truncated_not_fatal(clip_path):
    _, processor = C._load_clip(clip_path, "cpu")
    assert len(processor.tokenizer(LONG)["input_ids"]) > 77
    long, short = C.clip_text_embeds([LONG, "a boat"], clip_path)  # [d] each
    assert torch.isfinite(long).all()
    # Padding next to a long caption must not change a short caption's embedding.
    assert torch.allclose(short, C.clip_text_embeds(["a boat"], clip_path)[0], atol=1e-5)
    # ... and the truncated caption scores as its embedding says (the clamped cosine, x100)
    image = C.clip_image_embeds(_images(1), clip_path)[0]  # [d]
    expected = 100 * max(torch.nn.functional.cosine_similarity(image, long, dim=0).item(), 0.0)
    assert C.clip_score(_images(1), [LONG], clip_path) == pytest.approx(expected, abs=1e-4)


def test_mismatched_pairs_are_user_errors(clip_path):
    with pytest.raises(MTNError, match="one caption per image"):
        C.clip_score(_images(2), ["a dog"], clip_path)


def test_build_tiny_clip_is_deterministic(tmp_path, clip_path):
    images = _images(3, seed=4)
    scores = [C.clip_score(images, CAPTIONS[:3], str(T.build_tiny_clip(tmp_path / name, seed=seed)))
              for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert scores[0] == scores[1] == C.clip_score(images, CAPTIONS[:3], clip_path)
    assert scores[2] != scores[0]


def test_resolve_clip_reuses_the_cache(cache, clip_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached tiny CLIP")

    monkeypatch.setattr(T, "build_tiny_clip", fail)
    assert C.resolve_clip("tiny:clip-vit", cache) == clip_path
    assert C.resolve_clip(clip_path, "unused") == clip_path  # a local folder is used as is


def test_resolve_clip_refuses_hub_ids_and_missing_folders(tmp_path, mclip_path):
    with pytest.raises(MTNError, match="local folder"):
        C.resolve_clip("openai/clip-vit-large-patch14", tmp_path)
    with pytest.raises(MTNError, match="local folder"):
        C.resolve_clip(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(MTNError, match="expected a CLIPModel"):
        C.resolve_clip(mclip_path, tmp_path)  # an XLM-R folder, not a CLIP


# --------------------------------------------------------------------------- multilingual CLIP


def _hand_made_mclip(path, d_clip: int = 32, seed: int = 3):
    """A projection-layout folder whose weights we know: (model, tok, weight [d_clip, 40], bias [d_clip])."""
    model, tok = build_tiny_encoder("xlmr", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(d_clip, model.config.hidden_size, generator=gen), torch.randn(d_clip, generator=gen)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    save_file({"weight": weight, "bias": bias}, str(path / C.PROJECTION_FILE))
    return model, tok, weight, bias


def test_multilingual_encoder_known_answer(tmp_path):
    model, tok, weight, bias = _hand_made_mclip(tmp_path)
    texts = ["ein roter hund", "a black cat sleeps on the sofa in the morning", "un chien"]
    with torch.no_grad():  # one text at a time: no padding, so a plain mean over tokens is the mask-mean
        hidden = [model(**tok(t, return_tensors="pt")).last_hidden_state[0] for t in texts]  # [L_i, 40] each
    mean = torch.stack([h.mean(0) for h in hidden]) @ weight.T + bias  # [3, 32]
    cls = torch.stack([h[0] for h in hidden]) @ weight.T + bias  # [3, 32]
    encoder = C.MultilingualTextEncoder(tmp_path)
    assert encoder.pooling == "mean" and encoder.projection_dim == 32
    assert torch.allclose(encoder.encode(texts, batch_size=2), mean, atol=1e-4)
    assert torch.allclose(C.MultilingualTextEncoder(tmp_path, pooling="cls").encode(texts), cls, atol=1e-4)


@pytest.mark.parametrize("transformer_dir", ["", "0_Transformer"])
def test_sentence_transformers_layout_matches_projection_layout(tmp_path, transformer_dir):
    model, tok, weight, bias = _hand_made_mclip(tmp_path / "proj")
    st = tmp_path / "st"
    model.save_pretrained(st / transformer_dir)
    tok.save_pretrained(st / transformer_dir)
    modules = [
        {"idx": 0, "name": "0", "path": transformer_dir, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 40, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (st / "2_Dense").mkdir()
    (st / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 40, "out_features": 32, "bias": True,
         "activation_function": "torch.nn.modules.linear.Identity"}))
    save_file({"linear.weight": weight, "linear.bias": bias}, str(st / "2_Dense" / "model.safetensors"))
    assert C.resolve_mclip(str(st), "unused", "unused") == str(st)
    expected = C.MultilingualTextEncoder(tmp_path / "proj").encode(CAPTIONS)
    assert torch.allclose(C.MultilingualTextEncoder(st).encode(CAPTIONS), expected, atol=1e-5)


def test_unknown_layout_and_pooling_are_user_errors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MTNError, match="projection.safetensors"):
        C.MultilingualTextEncoder(tmp_path)
    _hand_made_mclip(tmp_path / "ok")
    with pytest.raises(MTNError, match="pooling"):
        C.MultilingualTextEncoder(tmp_path / "ok", pooling="max")


def test_tiny_mclip_round_trip_and_distillation(tmp_path, clip_path, mclip_path):
    encoder = C.MultilingualTextEncoder(mclip_path)
    first = encoder.encode(CAPTIONS)
    assert first.shape == (len(CAPTIONS), 32)
    rebuilt = T.build_tiny_mclip(tmp_path / "again", clip_path, seed=0)
    assert torch.equal(C.MultilingualTextEncoder(rebuilt).encode(CAPTIONS), first)
    # The projection was fitted to the CLIP text tower on TINY_CORPUS, so it lands near CLIP's text embeddings.
    cos = torch.nn.functional.cosine_similarity(encoder.encode(TINY_CORPUS), C.clip_text_embeds(TINY_CORPUS, clip_path))
    assert cos.mean() > 0.8


def test_multilingual_clip_score(cache, clip_path, mclip_path, tmp_path, monkeypatch):
    score = C.multilingual_clip_score(_images(4), CAPTIONS, clip_path, mclip_path)
    # CLIP's image side against the multilingual encoder's caption side, per pair (captions in 3 languages)
    cos = torch.nn.functional.cosine_similarity(C.clip_image_embeds(_images(4), clip_path),
                                                C.MultilingualTextEncoder(mclip_path).encode(CAPTIONS))  # [4]
    assert score == pytest.approx(float((100 * cos).clamp_min(0).mean()), abs=1e-4)
    _hand_made_mclip(tmp_path / "d16", d_clip=16)
    with pytest.raises(MTNError, match="belong together"):
        C.multilingual_clip_score(_images(2), CAPTIONS[:2], clip_path, str(tmp_path / "d16"))
    monkeypatch.setattr(T, "build_tiny_mclip", lambda *a: pytest.fail("rebuilt a cached tiny M-CLIP"))
    assert C.resolve_mclip("tiny:mclip", cache, clip_path) == mclip_path


def test_resolve_mclip_refuses_hub_ids_and_missing_folders(tmp_path, clip_path):
    for spec in ("sentence-transformers/clip-ViT-B-32-multilingual-v1", str(tmp_path / "missing")):
        with pytest.raises(MTNError, match="local folder"):
            C.resolve_mclip(spec, tmp_path, clip_path)
