"""Seeded toy CLIP and multilingual-CLIP folders for the evaluation metrics (built offline, in seconds).

Their scores exercise the plumbing, not image/caption quality: the CLIP weights are random. mtn.eval.clip's
``resolve_clip`` / ``resolve_mclip`` hand a ``tiny:`` spec to ``tiny_clip_folder`` / ``tiny_mclip_folder`` here,
which build each folder once under the evaluation's cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mtn.errors import MTNError
from mtn.eval.clip import MCLIP_META_FILE, PROJECTION_FILE, MultilingualTextEncoder, clip_text_embeds
from mtn.tiny import TINY_HIDDEN_SIZES, TINY_MAX_POSITIONS
from mtn.tiny.captions import TINY_CORPUS
from mtn.tiny.encoders import build_tiny_encoder
from mtn.tiny.tokenizers import build_tiny_tokenizer

TINY_CLIP_SPEC = "tiny:clip-vit"
TINY_MCLIP_SPEC = "tiny:mclip"
TINY_CLIP_PROJECTION_DIM = 32
TINY_CLIP_VISION_HIDDEN = 40
_RIDGE = 1e-2  # relative to the mean feature energy; the pooled toy features are nearly collinear


def build_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A seeded toy ``CLIPModel`` + ``CLIPProcessor`` saved with ``save_pretrained`` (loads fully offline)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tok = build_tiny_tokenizer("clip")
    # Text 48 wide, vision 40, projection 32: distinct widths so a wrong tensor never fits by accident.
    text = dict(vocab_size=len(tok), hidden_size=TINY_HIDDEN_SIZES["clip"], intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=TINY_MAX_POSITIONS["clip"],
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=TINY_CLIP_VISION_HIDDEN, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_CLIP_PROJECTION_DIM)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    # The PIL backend: transformers 5's default CLIPImageProcessor needs torchvision. Saved as
    # "CLIPImageProcessor", so an environment with torchvision loads the (equivalent) default one.
    images = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    path = Path(path)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path


def build_tiny_mclip(path: str | Path, clip_path: str | Path, seed: int = 0) -> Path:
    """Seeded toy XLM-R-like encoder + a projection into ``clip_path``'s embedding space (projection layout).

    The projection is a ridge least-squares fit of the mean-pooled encoder states onto the CLIP text tower's
    embeddings of ``TINY_CORPUS`` (English, German, French): a miniature of M-CLIP's teacher-student distillation,
    so the toy multilingual score tracks the toy CLIP score instead of sitting at a constant (often 0).
    """
    import torch
    from safetensors.torch import save_file

    model, tok = build_tiny_encoder("xlmr", seed=seed)
    enc = tok(TINY_CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    pooled = MultilingualTextEncoder.pool(hidden, enc["attention_mask"], "mean").double()  # [n, d_hidden]
    teacher = clip_text_embeds(TINY_CORPUS, str(clip_path), device="cpu").double()  # [n, d_clip]
    x = torch.cat([pooled, torch.ones(len(pooled), 1, dtype=pooled.dtype)], 1)  # [n, d_hidden + 1]: bias column
    gram = x.T @ x
    coef = torch.linalg.solve(gram + _RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype),
                              x.T @ teacher)  # [d_hidden + 1, d_clip]
    weight, bias = coef[:-1].T.float().contiguous(), coef[-1].float().contiguous()  # [d_clip, d_hidden], [d_clip]
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    save_file({"weight": weight, "bias": bias}, str(path / PROJECTION_FILE))
    meta = {"pooling": "mean", "clip_projection_dim": int(weight.shape[0]), "seed": seed}
    (path / MCLIP_META_FILE).write_text(json.dumps(meta) + "\n")
    return path


def tiny_clip_folder(spec: str, cache_dir: str | Path) -> str:
    """``tiny:clip-vit`` -> its folder under ``cache_dir``, built on first use."""
    _check_spec(spec, TINY_CLIP_SPEC)
    target = Path(cache_dir) / "tiny-clip-vit"
    if not (target / "config.json").is_file():
        _atomic_build(target, build_tiny_clip, "config.json")
    return str(target)


def tiny_mclip_folder(spec: str, cache_dir: str | Path, clip_path: str | Path) -> str:
    """``tiny:mclip`` -> its folder under ``cache_dir`` for the CLIP at ``clip_path``, built on first use."""
    _check_spec(spec, TINY_MCLIP_SPEC)
    # The toy projection is fitted to one CLIP model: one cached folder per CLIP folder.
    key = hashlib.sha1(str(Path(clip_path).resolve()).encode()).hexdigest()[:10]
    target = Path(cache_dir) / f"tiny-mclip-{key}"
    if not (target / PROJECTION_FILE).is_file():
        _atomic_build(target, lambda tmp: build_tiny_mclip(tmp, clip_path), PROJECTION_FILE)
    return str(target)


def _check_spec(spec: str, expected: str) -> None:
    if spec != expected:
        raise MTNError(f"unknown builtin model {spec!r}; the tiny CLIP models are {TINY_CLIP_SPEC!r} (image and text) "
                       f"and {TINY_MCLIP_SPEC!r} (multilingual text)")


def _atomic_build(target: Path, build, marker: str) -> Path:
    """``build(tmp_dir)`` then rename into place, so a concurrent or interrupted build never leaves a half folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / marker).is_file():  # lost a race only if the winner's folder is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
