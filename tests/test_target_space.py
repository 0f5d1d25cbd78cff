"""The declared target space of a translator (translator.json `target_space`), the pipeline's check of it, and the
pinned hub revisions that travel from the config into the encoders, the feature-cache record and the manifest."""

import json

import pytest
import torch

from mtn.errors import MTNError
from mtn.pipeline import check_translator, text_embeddings
from mtn.tiny.sd import build_tiny_sd_pipeline
from mtn.tiny.translator import build_tiny_translator
from mtn.translator import load_translator, read_target_space, target_space_tags


def pipeline_with_cross_dim(cross: int):
    """The tiny SD pipeline (tokenizer padding to 77) with a UNet that cross-attends to `cross`-d text."""
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_sd_pipeline()
    pipe.unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8,
                                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross,
                                     attention_head_dim=4, norm_num_groups=8)
    return pipe


def test_the_manifest_declares_the_target_space(tmp_path):
    build_tiny_translator(target_dim=48, seed=0).save(tmp_path / "tr")
    manifest = json.loads((tmp_path / "tr" / "translator.json").read_text())
    want = {"encoder": "tiny:clip", "subfolder": None, "revision": None, "width": 48, "length": 77,
            "padding": "max_length"}
    assert manifest["target_space"] == want
    assert read_target_space(tmp_path / "tr") == want  # without loading the weights
    tr = load_translator(tmp_path / "tr")
    assert tr.target_space == want and tr.encode(["ein Hund"]).shape == (1, 77, 48)  # [B, S_t, d_t] as declared
    assert target_space_tags(want) == {"mtn.target_encoder": "tiny:clip", "mtn.target_width": "48",
                                       "mtn.target_length": "77"}


def test_a_folder_written_before_target_space_still_loads_and_derives_it(tmp_path):
    build_tiny_translator(target_dim=32, target_len=40, seed=0).save(tmp_path / "old")
    path = tmp_path / "old" / "translator.json"
    manifest = json.loads(path.read_text())
    manifest.pop("target_space")
    manifest["target_encoder"].update(name_or_path="org/clip", subfolder="text_encoder", hub_revision="abc123")
    path.write_text(json.dumps(manifest))
    want = {"encoder": "org/clip", "subfolder": "text_encoder", "revision": "abc123", "width": 32, "length": 40,
            "padding": "max_length"}
    assert load_translator(tmp_path / "old").target_space == want  # from the target_encoder spec + the MTN config
    assert read_target_space(tmp_path / "old") == want
    assert target_space_tags(want)["mtn.target_revision"] == "abc123"
    assert target_space_tags(want)["mtn.target_subfolder"] == "text_encoder"


def test_a_384_d_translator_is_refused_by_a_768_d_pipeline_in_one_line():
    pipe, translator = pipeline_with_cross_dim(768), build_tiny_translator(target_dim=384, seed=0)
    for call in (lambda: check_translator(pipe, translator), lambda: text_embeddings(pipe, translator, ["x"], [""])):
        with pytest.raises(MTNError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "384" in msg and "768" in msg and "tiny:clip" in msg, msg


def test_a_translator_of_another_length_is_refused_and_a_matching_one_passes():
    pipe = pipeline_with_cross_dim(48)
    with pytest.raises(MTNError) as e:
        check_translator(pipe, build_tiny_translator(target_dim=48, target_len=64, seed=0))
    msg = str(e.value)
    assert "\n" not in msg and "64" in msg and "77" in msg, msg
    ok = build_tiny_translator(target_dim=48, seed=0)
    assert check_translator(pipe, ok)["width"] == 48
    pos, neg = text_embeddings(pipe, ok, ["ein Hund"], [""])
    assert pos.shape == neg.shape == (1, 77, 48)


def test_a_pinned_revision_reaches_the_model_the_tokenizer_and_the_config(tmp_path, monkeypatch):
    """load_text_encoder(..., revision=) hands it to every from_pretrained/config read and records it."""
    import transformers

    from mtn.encoders import load_text_encoder

    load_text_encoder("tiny:clip", max_length=77).save(tmp_path / "clip")
    seen = []
    for label, cls, attr in (("model", transformers.CLIPTextModel, "from_pretrained"),
                             ("tokenizer", transformers.AutoTokenizer, "from_pretrained"),
                             ("config", transformers.PretrainedConfig, "get_config_dict")):
        original = getattr(cls, attr).__func__

        def spy(klass, *args, _original=original, _label=label, **kwargs):
            seen.append((_label, kwargs.get("revision")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, attr, classmethod(spy))
    enc = load_text_encoder(str(tmp_path / "clip"), max_length=77, revision="v1.0")
    assert {label for label, rev in seen if rev == "v1.0"} == {"model", "tokenizer", "config"}, seen
    assert enc.spec()["hub_revision"] == "v1.0"
    assert load_text_encoder(str(tmp_path / "clip"), max_length=77).spec()["hub_revision"] is None  # None: main


def test_load_translator_asks_for_the_recorded_revision(tmp_path, monkeypatch):
    import mtn.translator as translator_module

    build_tiny_translator(seed=0).save(tmp_path / "tr")  # not bundled: the manifest's source id is loaded
    path = tmp_path / "tr" / "translator.json"
    manifest = json.loads(path.read_text())
    manifest["source_encoder"]["hub_revision"] = "deadbeef"
    path.write_text(json.dumps(manifest))
    calls = []
    real = translator_module.load_text_encoder
    monkeypatch.setattr(translator_module, "load_text_encoder",
                        lambda *a, **kw: calls.append(kw.get("revision")) or real(*a, **kw))
    assert load_translator(tmp_path / "tr").encode(["x"]).shape == (1, 77, 48)
    assert calls == ["deadbeef"]


def test_the_feature_cache_records_the_pinned_revision_and_refuses_another(tmp_path):
    from mtn.config import load_config
    from mtn.data.features import check_cache, expected_record, write_feature_manifest

    cfg = load_config(None, ["corpus=generated:20"])
    pinned = load_config(None, ["corpus=generated:20", "target_revision=abc123"])
    pairs = [("a dog", "a dog")]
    record = expected_record(pinned, pairs, [pinned.corpus])
    assert record["target_encoder"]["hub_revision"] == "abc123" and record["source_encoder"]["hub_revision"] is None
    url = str(tmp_path / "cache")
    write_feature_manifest(url, record, [], {"source_dim": 32, "target_dim": 48}, "float16")
    assert check_cache(url, expected_record(pinned, pairs, [pinned.corpus]))["target_encoder"]["hub_revision"] == "abc123"
    with pytest.raises(MTNError, match=r"target_encoder.hub_revision: cache has 'abc123', config wants None"):
        check_cache(url, expected_record(cfg, pairs, [cfg.corpus]))
    # a cache written before revisions were recorded (no hub_revision key) still matches an unpinned config
    old = expected_record(cfg, pairs, [cfg.corpus])
    for side in ("source_encoder", "target_encoder"):
        old[side].pop("hub_revision")
    write_feature_manifest(str(tmp_path / "old"), old, [], {"source_dim": 32, "target_dim": 48}, "float16")
    check_cache(str(tmp_path / "old"), expected_record(cfg, pairs, [cfg.corpus]))


def test_encode_gives_the_declared_shape():
    tr = build_tiny_translator(target_dim=48, seed=0)
    out = tr.encode(["a", "bb"])  # [2, S_t, d_t]
    assert out.shape == (2, tr.target_space["length"], tr.target_space["width"]) and out.dtype == torch.float32
