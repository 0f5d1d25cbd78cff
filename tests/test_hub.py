"""Hub ids wherever a model URI goes, resolved offline from a populated Hugging Face cache (tests/hub_models.py):
fetch_folder, load_pipeline, translators whose source encoder is a hub id, and `mtn serve` on SD 1.5's hub id."""

import shutil
from pathlib import Path

import pytest

from mtn.errors import MTNError
from mtn.uris import fetch_folder, parse_hub_id
from tests.hub_models import (
    CLIP_HIDDEN,
    CLIP_LEN,
    SD15_ID,
    XLMR_HIDDEN,
    XLMR_LARGE_ID,
    populate_hf_cache,
    sd15_like,
    untrained_translator_folder,
    xlmr_large_like,
    xlmr_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
SD_LIKE = "mtn-test/sd15-like"
TRANSLATOR_ID = "mtn-test/xlmr-large-sd15"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The stand-in folders, built once: {"xlmr", "sd", "translator"} -> folder."""
    root = tmp_path_factory.mktemp("hub-models")
    return {"xlmr": xlmr_large_like(root / "xlmr"), "sd": sd15_like(root / "sd"),
            "translator": untrained_translator_folder(root / "translator", source_id=XLMR_LARGE_ID)}


@pytest.fixture(scope="module")
def hf_home(built, tmp_path_factory):
    """An HF_HOME whose cache holds the stand-ins under hub ids: {"home", "commits": {repo_id: commit}}."""
    home = tmp_path_factory.mktemp("hf-home")
    snaps = {XLMR_LARGE_ID: populate_hf_cache(home, XLMR_LARGE_ID, built["xlmr"]),
             SD_LIKE: populate_hf_cache(home, SD_LIKE, built["sd"]),
             TRANSLATOR_ID: populate_hf_cache(home, TRANSLATOR_ID, built["translator"])}
    return {"home": home, "snapshots": snaps}


@pytest.fixture
def offline(hf_home, monkeypatch):
    """This process (and its children) reads hub ids from hf_home only. huggingface_hub reads HF_HOME and
    HF_HUB_OFFLINE at import, so its constants are set too (transformers and diffusers read them per call)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home["home"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home["home"]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home["home"] / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_parse_hub_id(tmp_path, monkeypatch):
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5@main") == (SD15_ID, "main")
    assert parse_hub_id(f"{SD15_ID}@{'a' * 40}") == (SD15_ID, "a" * 40)
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_hub in ("./org/name", "/org/name", "~/org/name", "a/b/c", "name", "s3://b/p", "models:/m@champion",
                    "org/../x", "org--x/y", "org/name@", "tiny:sd"):
        assert parse_hub_id(not_hub) is None, not_hub
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert parse_hub_id("org/name") is None  # an existing folder is a folder


def test_xlmr_stand_in_is_hub_shaped(built):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["xlmr"])
    assert [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.mask_token == "<mask>"
    ids = tok("ein roter Hund läuft am Strand")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids  # <s> ... </s>, every word covered by pieces
    cfg = AutoConfig.from_pretrained(built["xlmr"])
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads) == ("xlm-roberta", XLMR_HIDDEN, 16)
    assert xlmr_tokenizer().get_vocab() == tok.get_vocab()  # deterministic: a rebuild learns the same pieces


def test_fetch_folder_reads_hub_ids_from_the_cache(offline, tmp_path):
    snap = offline["snapshots"][TRANSLATOR_ID]
    commit = snap.name
    mtn_cache = tmp_path / "mtn-cache"
    for uri in (TRANSLATOR_ID, f"{TRANSLATOR_ID}@main", f"{TRANSLATOR_ID}@{commit}"):
        assert fetch_folder(uri, "translator.json", mtn_cache) == snap, uri
    assert fetch_folder(f"{SD_LIKE}@main", "model_index.json", mtn_cache) == offline["snapshots"][SD_LIKE]
    assert not mtn_cache.exists()  # nothing copied: the HF cache is the copy
    with pytest.raises(MTNError, match="holds no model_index.json"):
        fetch_folder(TRANSLATOR_ID, "model_index.json", mtn_cache)  # the marker check stays


@pytest.mark.parametrize("uri,revision", [("mtn-test/not-cached", "main"), (f"{TRANSLATOR_ID}@v9", "v9")])
def test_a_hub_id_missing_from_the_cache_is_one_line(offline, uri, revision):
    with pytest.raises(MTNError) as e:
        fetch_folder(uri, "translator.json")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert uri.split("@")[0] in msg and f"revision {revision}" in msg
    assert "HF_HOME" in msg and "HF_HUB_OFFLINE" in msg and str(offline["home"]) in msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)  # no chain


def test_a_local_folder_wins_over_the_hub_id(offline, built, tmp_path, monkeypatch):
    local = tmp_path / TRANSLATOR_ID  # ./mtn-test/xlmr-large-sd15, spelled as the cached hub id
    shutil.copytree(built["translator"], local)
    monkeypatch.chdir(tmp_path)
    assert fetch_folder(TRANSLATOR_ID, "translator.json").resolve() == local.resolve()


def test_load_pipeline_from_a_hub_id_offline(offline):
    from mtn.pipeline import load_pipeline

    pipe = load_pipeline(f"{SD_LIKE}@main")
    assert pipe.unet.config.cross_attention_dim == CLIP_HIDDEN == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8 and pipe.safety_checker is None
    ids = pipe.tokenizer("ein Hund", padding="max_length").input_ids
    assert len(ids) == CLIP_LEN and ids[-1] == pipe.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    commit = offline["snapshots"][SD_LIKE].name
    assert load_pipeline(f"{SD_LIKE}@{commit}").unet.config.cross_attention_dim == CLIP_HIDDEN
    with pytest.raises(MTNError) as e:
        load_pipeline("mtn-test/no-such-pipeline@main")
    assert "\n" not in str(e.value) and "mtn-test/no-such-pipeline" in str(e.value) and "HF_HOME" in str(e.value)


def test_translator_from_a_hub_id_loads_its_source_encoder_from_the_cache(offline):
    """The translator folder names its source encoder by hub id only (nothing bundled): transformers finds it in
    the same HF cache under HF_HUB_OFFLINE=1."""
    from mtn.translator import load_translator

    tr = load_translator(fetch_folder(f"{TRANSLATOR_ID}@main", "translator.json"))
    assert tr.source_encoder.name_or_path == XLMR_LARGE_ID and tr.source_encoder.hidden_size == XLMR_HIDDEN
    emb = tr.encode(["ein roter Hund läuft am Strand", ""])  # [2, 77, 768]
    assert tuple(emb.shape) == (2, CLIP_LEN, CLIP_HIDDEN) and emb.isfinite().all()


# ----------------------------------------------------------------------------------------------- acceptance


# `mtn serve --config serve/config.yaml` on SD 1.5's hub id with a hub-id translator route, from an offline cache:
# tests/test_real_shapes.py (it serves the translator that test trains and registers).
