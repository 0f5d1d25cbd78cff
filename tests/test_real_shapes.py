"""The path a user takes, at the real shapes: jobs/configs/xlmr-large_sd15.yaml as shipped (hub ids, pinned
revisions) with CPU-sized overrides, against hub-shaped stand-ins of the real model classes at the real widths
(XLMRobertaModel 1024-d -> CLIPTextModel 768-d, 77 tokens, a UNet2DConditionModel cross-attending at 768; one layer
each, seeded; tests/hub_models.py) in an offline Hugging Face cache:

    mtn extract -> mtn train (registers models:/mtn-xlmr-large-sd15@champion) -> mtn serve (SD 1.5's hub id + that
    registered translator) -> one POST /v1/generate over HTTP

The service also takes a translator route that is a hub id (`org/name@rev`), from the same offline cache. This is the
test that catches a translator whose width the UNet cannot take (a 384-d target on a 768-d UNet)."""

import base64
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mtn.config import load_config
from mtn.tiny.captions import parallel_captions
from mtn.train_config import TrainConfig
from tests.hub_models import (
    CLIP_HIDDEN,
    CLIP_LEN,
    SD15_ID,
    XLMR_HIDDEN,
    XLMR_LARGE_ID,
    populate_hf_cache,
    sd15_like,
    xlmr_large_like,
)
from tests.serving import mtn_serve_process

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "jobs" / "configs" / "xlmr-large_sd15.yaml"
HUB_TRANSLATOR = "mtn-test/xlmr-large-sd15-de"  # a translator published on the hub, as a user would


def _write_parallel(root: Path, split: str, n: int, seed: int) -> None:
    for lang in ("de", "en"):
        with gzip.open(root / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(parallel_captions(n, lang, seed=seed)) + "\n")


def _run(cmd: list[str], env: dict, cwd: Path) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_extract_train_register_serve_generate_at_the_real_widths(tmp_path):
    import mlflow
    import requests
    from PIL import Image

    cfg = load_config(CONFIG, cls=TrainConfig)
    # the stand-ins take the place of the pinned hub commits the config names (and serve/config.yaml serves)
    home, models = tmp_path / "hf", tmp_path / "models"
    populate_hf_cache(home, XLMR_LARGE_ID, xlmr_large_like(models / "xlmr"), commit=cfg.source_revision)
    populate_hf_cache(home, SD15_ID, sd15_like(models / "sd"), commit=cfg.target_revision)
    assert (cfg.source_encoder, cfg.target_encoder, cfg.target_subfolder) == (XLMR_LARGE_ID, SD15_ID, "text_encoder")

    data = tmp_path / "data"
    data.mkdir()
    _write_parallel(data, "train", 48, seed=1)
    _write_parallel(data, "val", 8, seed=2)
    ray_tmp = tempfile.mkdtemp(prefix="ray-rs-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", MLFLOW_TRACKING_URI=tracking, RAY_TMPDIR=ray_tmp,
               MTN_CACHE=str(tmp_path / "mtn-cache"), PYTHONUNBUFFERED="1", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    out = tmp_path / "out"
    # CPU-sized: one worker, no GPU, a few steps, the smallest mixer; everything that defines the text space (the
    # encoders, their revisions, 77 target positions, padding, mse on all positions) stays as the config says
    overrides = [f"data_root={data}", "source_lang=de", "languages=[de]", "max_val_samples=8",
                 f"feature_cache={tmp_path / 'features/train'}", f"val_feature_cache={tmp_path / 'features/val'}",
                 "use_gpu=false", "gpus_per_worker=0", "cpus_per_worker=1", "extract_workers=1",
                 "extract_batch_size=16", "precision=fp32", f"output_dir={out}", f"storage_path={tmp_path / 'ray'}",
                 "name=real-shapes", "max_steps=3", "val_every=3", "checkpoint_every=3", "batch_size=8",
                 "warmup_steps=1", "num_modules=1", "decoder_modules=1", "compare_linear=false"]
    mtn = str(Path(sys.executable).parent / "mtn")
    try:
        _run([mtn, "extract", "--config", str(CONFIG), *overrides], env, tmp_path)
        trained = _run([mtn, "train", "--config", str(CONFIG), *overrides], env, tmp_path)
        assert "registered as models:/mtn-xlmr-large-sd15/1" in trained, trained[-2000:]

        # the registered version says which text space it targets, without a download
        client = mlflow.MlflowClient(tracking)
        version = client.get_model_version_by_alias("mtn-xlmr-large-sd15", "champion")
        assert str(version.version) == "1"
        assert version.tags["mtn.target_encoder"].startswith(SD15_ID)
        assert (version.tags["mtn.target_width"], version.tags["mtn.target_length"]) == (str(CLIP_HIDDEN), str(CLIP_LEN))

        # serve/config.yaml as shipped (SD 1.5's hub id, the registered translator as `multi`) with CPU-sized
        # overrides, plus a `de` route whose translator is a hub id: the trained folder, published as a hub repo
        populate_hf_cache(home, HUB_TRANSLATOR, out / "translator")
        serve_args = ["--config", str(ROOT / "serve" / "config.yaml"), "device=cpu", "dtype=float32",
                      f"translators.de={HUB_TRANSLATOR}@main",
                      "limits.max_width=64", "limits.max_height=64", "limits.max_steps=4", "limits.max_images=1",
                      "defaults.num_inference_steps=2", "defaults.width=64", "defaults.height=64",
                      "batching.max_batch_size=2"]
        with mtn_serve_process(serve_args, env, tmp_path) as url:
            answers = {lang: requests.post(f"{url}/v1/generate", timeout=180,
                                           json={"prompt": prompt, "language": lang, "seed": 0})
                       for lang, prompt in (("de", "ein roter Hund läuft am Strand"),
                                            ("fr", "un chien rouge court sur la plage"))}
        for lang, route in (("de", "de"), ("fr", "multi")):  # fr has no route of its own: the fallback, multi
            r = answers[lang]
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["route"]["route"] == route
            (png,) = body["images"]
            assert Image.open(io.BytesIO(base64.b64decode(png))).size == (64, 64)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # the translator folder at the real widths: XLM-R's 1024-d states in, SD's [77, 768] prompt embeddings out
    from mtn import load_translator

    tr = load_translator(out / "translator", source_encoder=str(models / "xlmr"))
    assert (tr.source_encoder.hidden_size, tr.target_shape) == (XLMR_HIDDEN, (CLIP_LEN, CLIP_HIDDEN))
