import json
import shutil

import pytest
import torch

from mtn import MTNError, load_translator
from mtn.encoders import load_text_encoder
from mtn.losses import mtn_losses
from mtn.model import ModelTranslationNetwork
from mtn.tiny.captions import generate_captions
from mtn.translator import Translator


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny translator trained for a few steps in-process (tiny T5 -> tiny CLIP), saved as the job saves it."""
    source = load_text_encoder("tiny:t5", max_length=16)
    target = load_text_encoder("tiny:clip", max_length=77)
    torch.manual_seed(0)
    mtn = ModelTranslationNetwork(source_dim=source.hidden_size, target_dim=target.hidden_size, source_len=16,
                                  target_len=77, num_modules=1, hidden_dim=32)
    opt = torch.optim.AdamW(mtn.parameters(), lr=1e-3)
    texts = generate_captions(32)
    s, sm = source(texts)
    t, tm = target(texts)
    losses = []
    for _ in range(5):
        total, _ = mtn_losses(mtn, None, s, sm, t, tm, {"mse": 1.0, "rec": 0.1, "cycle": 0.0, "adv": 0.0})
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0]
    out = tmp_path_factory.mktemp("tr") / "translator"
    Translator(source, mtn, {"target_encoder": target.spec()}).save(out, training={"steps": 5})
    return out, mtn, texts


def test_load_translator_encodes_like_the_trained_model(trained_dir):
    path, mtn, texts = trained_dir
    tr = load_translator(path)
    emb = tr.encode(texts[:3])
    assert emb.shape == (3, 77, 48) and emb.dtype == torch.float32
    s, sm = load_text_encoder("tiny:t5", max_length=16)(texts[:3])
    torch.testing.assert_close(emb, mtn.eval().encode(s, sm))
    assert tr.encode([""]).shape == (1, 77, 48)  # unconditional embedding for guidance
    assert tr.manifest["training"]["steps"] == 5 and tr.manifest["target_encoder"]["name_or_path"] == "tiny:clip"
    assert tr.encode((texts * 3)[:70], batch_size=32).shape == (70, 77, 48)  # chunked encode


def test_length_sorted_batches_return_rows_in_prompt_order(trained_dir):
    path, _, texts = trained_dir
    tr = load_translator(path)
    prompts = ["a", texts[0] + " " + texts[1], "", texts[2], "dog"]  # lengths out of order, batches of 2
    batched = tr.encode(prompts, batch_size=2)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(batched[i], tr.encode([p])[0], rtol=1e-4, atol=1e-5)


def test_bundled_source_encoder(trained_dir, tmp_path):
    path, _, texts = trained_dir
    tr = load_translator(path)
    tr.save(tmp_path / "b", bundle_source_encoder=True, training={"steps": 5})
    assert (tmp_path / "b" / "source_encoder" / "config.json").is_file()
    torch.testing.assert_close(load_translator(tmp_path / "b").encode(texts[:2]), tr.encode(texts[:2]))


@pytest.mark.parametrize("prompts,match", [([], "non-empty list"), ("a dog", "not a single string"),
                                           (["ok", 3], "items \\[1\\]")])
def test_bad_prompts(trained_dir, prompts, match):
    with pytest.raises(MTNError, match=match):
        load_translator(trained_dir[0]).encode(prompts)


@pytest.mark.parametrize("remove,match", [("translator.json", "missing translator.json"),
                                          ("mtn/diffusion_pytorch_model.safetensors", "missing mtn/diffusion_pytorch"),
                                          ("mtn/config.json", "missing mtn/config.json")])
def test_incomplete_folder_names_what_is_missing(trained_dir, tmp_path, remove, match):
    broken = tmp_path / "broken"
    shutil.copytree(trained_dir[0], broken)
    (broken / remove).unlink()
    with pytest.raises(MTNError, match=match):
        load_translator(broken)


def test_bad_manifest(trained_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_dir[0], broken)
    m = json.loads((broken / "translator.json").read_text())
    del m["target_encoder"]
    (broken / "translator.json").write_text(json.dumps(m))
    with pytest.raises(MTNError, match="lacks the 'target_encoder' reference"):
        load_translator(broken)
    with pytest.raises(MTNError, match="translator folder not found"):
        load_translator(tmp_path / "nowhere")


def test_source_encoder_must_match_mtn(trained_dir):
    with pytest.raises(MTNError, match="expects"):
        load_translator(trained_dir[0], source_encoder=load_text_encoder("tiny:bert", max_length=16))
