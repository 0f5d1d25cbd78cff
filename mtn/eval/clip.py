"""CLIP score (image <-> caption agreement) and its multilingual variant, offline only.

``clip_score`` is CLIP-S of Hessel et al. (2021): the mean over pairs of ``100 * max(cos(E_image, E_text), 0)``.
``multilingual_clip_score`` is the same with the caption embedded by a multilingual text encoder that was
distilled into CLIP's embedding space (M-CLIP / sentence-transformers "clip-ViT-B-32-multilingual-v1" style).

Nothing here downloads: models come from local folders, or ``tiny:*`` specs that build seeded toy models
(``mtn.tiny.clip``; for tests and the local default job, their scores measure plumbing, not quality).

Compatibility notes (transformers 5, torchmetrics 1.9):
- ``CLIPModel.get_*_features`` return a ``BaseModelOutputWithPooling`` (projected embeds in ``pooler_output``), and
  torchmetrics 1.9 calls ``.norm`` on that and crashes; it also accepts a string path only if it contains "openai",
  "jinaai" or "zer0int". ``clip_score_torchmetrics`` therefore hands it a loader returning wrapped objects.
- torchmetrics clamps the *mean* (``max(mean(100 cos), 0)``) and slices over-long token sequences (dropping the
  EOS token CLIP pools from); ``clip_score`` clamps each pair and truncates with the tokenizer (keeping EOS).
  Both agree whenever every pair has cos >= 0 and captions fit, which is the normal case for a real CLIP.
- ``CLIPImageProcessor`` needs torchvision; without it we use ``CLIPImageProcessorPil`` (same preprocessing).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtn.errors import MTNError

if TYPE_CHECKING:
    import torch
    from PIL import Image

TINY_PREFIX = "tiny:"  # tiny:clip-vit, tiny:mclip: seeded toy models from mtn.tiny.clip
PROJECTION_FILE = "projection.safetensors"
MCLIP_META_FILE = "mclip.json"  # {"pooling": "mean"|"cls"} next to projection.safetensors
_POOLINGS = ("mean", "cls")
_NO_DOWNLOAD = ("nothing is downloaded here: pass a local folder, e.g. one made with "
                "`huggingface-cli download {hint} --local-dir DIR`")


# --------------------------------------------------------------------------- shared helpers


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _features(out: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features``: a tensor in transformers 4, ``pooler_output`` in 5."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    raise MTNError(f"cannot read CLIP features from a {type(out).__name__}")


def _pairs(images: list, texts: list[str]) -> None:
    if len(images) != len(texts):
        raise MTNError(f"need one caption per image, got {len(images)} images and {len(texts)} captions")
    if not images:
        raise MTNError("no image/caption pairs to score")


# --------------------------------------------------------------------------- CLIP


def resolve_clip(spec: str, cache_dir: str | Path) -> str:
    """``"tiny:clip-vit"`` -> built once under ``cache_dir``; a local folder with config.json -> itself."""
    if spec.startswith(TINY_PREFIX):
        from mtn.tiny.clip import tiny_clip_folder  # offline stand-in, imported only when asked for

        return tiny_clip_folder(spec, cache_dir)
    folder = Path(spec).expanduser()
    if (folder / "config.json").is_file():
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in (None, "clip"):
            raise MTNError(f"CLIP model folder {folder} holds a {model_type!r} model, expected a CLIPModel ('clip')")
        return str(folder)
    raise MTNError(f"CLIP model {spec!r} is neither 'tiny:clip-vit' nor a local folder with a config.json; "
                   + _NO_DOWNLOAD.format(hint="openai/clip-vit-large-patch14"))


@functools.lru_cache(maxsize=2)
def _load_clip(model_path: str, device: str):
    """``(CLIPModel, CLIPProcessor)``; cached because one evaluation embeds images and texts separately."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    from transformers.utils import is_torchvision_available

    if not (Path(model_path) / "config.json").is_file():
        raise MTNError(f"no CLIP model at {model_path} (missing config.json); use resolve_clip() first")
    model = CLIPModel.from_pretrained(model_path).to(device).eval()
    if is_torchvision_available():
        processor = CLIPProcessor.from_pretrained(model_path)
    else:  # same preprocessing, minus the "falling back to CLIPImageProcessorPil" warning
        processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(model_path),
                                  tokenizer=AutoTokenizer.from_pretrained(model_path))
    return model, processor


def _max_text_len(model) -> int:
    return int(model.config.text_config.max_position_embeddings)


def clip_image_embeds(images: list[Image.Image], model_path: str, batch_size: int = 16,
                      device: str | None = None) -> torch.Tensor:
    """CLIP image embeddings (projected, not normalized), ``[N, projection_dim]`` on the CPU."""
    import torch

    model, processor = _load_clip(str(model_path), _device(device))
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[i : i + batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"]  # [B, 3, S, S]
            out.append(_features(model.get_image_features(pixel_values=pixels.to(model.device))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def clip_text_embeds(texts: list[str], model_path: str, batch_size: int = 16,
                     device: str | None = None) -> torch.Tensor:
    """CLIP text embeddings ``[N, projection_dim]``; captions over the model's length are truncated (EOS kept)."""
    import torch

    model, processor = _load_clip(str(model_path), _device(device))
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = processor(text=list(texts[i : i + batch_size]), padding=True, truncation=True,
                            max_length=_max_text_len(model), return_tensors="pt")  # [B, L <= max_len]
            feats = model.get_text_features(input_ids=enc["input_ids"].to(model.device),
                                            attention_mask=enc["attention_mask"].to(model.device))
            out.append(_features(feats).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def clip_pair_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair ``100 * max(cos(image_i, text_i), 0)``, ``[N]``."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise MTNError(f"need two [N, d] embedding tensors of one shape, got {tuple(image_embeds.shape)} and "
                       f"{tuple(text_embeds.shape)}")
    a, b = image_embeds.double(), text_embeds.double()  # double: identical inputs give exactly 100
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-12)  # [N]
    return (100 * cos.clamp(-1, 1)).clamp_min(0)


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean over pairs of ``100 * max(cos(image_i, text_i), 0)``, in [0, 100]."""
    if len(image_embeds) == 0:
        raise MTNError("no image/caption pairs to score")
    return float(clip_pair_scores(image_embeds, text_embeds).mean())


def clip_score(images: list[Image.Image], texts: list[str], model_path: str, batch_size: int = 16,
               device: str | None = None) -> float:
    """CLIP-S: mean over pairs of ``100 * max(cos, 0)`` between CLIP image and caption embeddings."""
    _pairs(images, texts)
    image = clip_image_embeds(images, model_path, batch_size, device)  # [N, d]
    text = clip_text_embeds(texts, model_path, batch_size, device)  # [N, d]
    return clip_score_from_embeddings(image, text)


class _TensorFeatures:
    """Gives torchmetrics 1.9 tensors from transformers 5's ``get_*_features`` (it calls ``.norm`` on them)."""

    def __init__(self, model) -> None:
        self.model, self.config = model, model.config

    def to(self, device):
        self.model.to(device)
        return self

    def get_image_features(self, pixel_values):
        return _features(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return _features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _TruncatingProcessor:
    """Tokenizes with truncation so torchmetrics never slices off the EOS token CLIP pools from."""

    def __init__(self, processor, max_length: int) -> None:
        self.processor, self.max_length = processor, max_length

    def __call__(self, text=None, images=None, **kwargs):
        if text is not None:
            return self.processor(text=text, truncation=True, max_length=self.max_length, **kwargs)
        kwargs.pop("padding", None)  # torchmetrics passes padding=True with images too
        return self.processor(images=images, **kwargs)


def clip_score_torchmetrics(images: list[Image.Image], texts: list[str], model_path: str, batch_size: int = 16,
                            device: str | None = None) -> float:
    """torchmetrics ``CLIPScore`` on the same model: ``max(mean(100 cos), 0)`` (clamps the mean, not each pair)."""
    import numpy as np
    import torch
    from torchmetrics.multimodal import CLIPScore

    _pairs(images, texts)
    model, processor = _load_clip(str(model_path), _device(device))
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model),
                                                   _TruncatingProcessor(processor, _max_text_len(model))))
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            # torchmetrics only recognizes images as tensors: uint8 [3, H, W], on the model's device.
            batch = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(model.device)
                     for im in images[i : i + batch_size]]
            metric.update(batch, list(texts[i : i + batch_size]))
    return float(metric.compute())


# --------------------------------------------------------------------------- multilingual CLIP


class MultilingualTextEncoder:
    """A multilingual text encoder + linear projection into a CLIP image-embedding space (local folder only).

    Layouts: (a) a transformers encoder + tokenizer with ``projection.safetensors`` (``weight`` [d_clip, d_hidden],
    optional ``bias``) and optional ``mclip.json`` ({"pooling": ...}); (b) a sentence-transformers folder
    (modules.json: Transformer at "" or "0_Transformer", Pooling, Dense with ``linear.weight``/``linear.bias``).
    ``pooling`` ("mean" over the attention mask, or "cls") overrides the folder's own choice.
    """

    def __init__(self, path: str | Path, pooling: str | None = None, device: str | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        root = Path(path).expanduser()
        self.max_length: int | None = None
        self.lowercase, self.normalize, self.activation = False, False, None
        if (root / PROJECTION_FILE).is_file():
            enc_dir, own_pooling = root, "mean"
            if (root / MCLIP_META_FILE).is_file():
                own_pooling = json.loads((root / MCLIP_META_FILE).read_text()).get("pooling", "mean")
            weight, bias = _read_linear(root / PROJECTION_FILE, "weight", "bias")
        elif (root / "modules.json").is_file():
            enc_dir, own_pooling, weight, bias = self._read_sentence_transformers(root)
        else:
            raise MTNError(f"{root} is not a multilingual CLIP text-encoder folder: expected a transformers encoder "
                           f"+ tokenizer with {PROJECTION_FILE} (key 'weight' [d_clip, d_hidden], optional 'bias'), "
                           "or a sentence-transformers folder (modules.json with Transformer, Pooling and Dense); "
                           + _NO_DOWNLOAD.format(hint="sentence-transformers/clip-ViT-B-32-multilingual-v1"))
        self.pooling = pooling or own_pooling
        if self.pooling not in _POOLINGS:
            raise MTNError(f"pooling must be one of {', '.join(_POOLINGS)}, got {self.pooling!r}")
        self.device = _device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(enc_dir, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(enc_dir, trust_remote_code=False).to(self.device).eval()
        hidden = self.model.config.hidden_size
        if weight.ndim != 2 or weight.shape[1] != hidden or (bias is not None and bias.shape != weight.shape[:1]):
            raise MTNError(f"projection in {root} has weight {tuple(weight.shape)} / bias "
                           f"{None if bias is None else tuple(bias.shape)}; the encoder's hidden size is {hidden}")
        self.weight = weight.to(self.device, torch.float32)  # [d_clip, d_hidden]
        self.bias = None if bias is None else bias.to(self.device, torch.float32)  # [d_clip]

    def _read_sentence_transformers(self, root: Path):
        modules = {m["type"].rsplit(".", 1)[-1]: root / m.get("path", "")
                   for m in json.loads((root / "modules.json").read_text())}
        if not {"Transformer", "Pooling", "Dense"} <= modules.keys() or set(modules) - {
            "Transformer", "Pooling", "Dense", "Normalize"}:
            raise MTNError(f"{root}/modules.json lists {sorted(modules)}; supported is exactly Transformer, Pooling, "
                           "Dense (and optionally Normalize)")
        st_cfg = modules["Transformer"] / "sentence_bert_config.json"
        if st_cfg.is_file():
            cfg = json.loads(st_cfg.read_text())
            self.max_length, self.lowercase = cfg.get("max_seq_length"), bool(cfg.get("do_lower_case", False))
        pool = json.loads((modules["Pooling"] / "config.json").read_text())
        modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                             "lasttoken") if pool.get(f"pooling_mode_{k}")]
        if modes not in (["cls_token"], ["mean_tokens"]):
            raise MTNError(f"{modules['Pooling']}: only mean or cls pooling is supported, got {modes}")
        dense = json.loads((modules["Dense"] / "config.json").read_text())
        act = dense.get("activation_function", "torch.nn.modules.linear.Identity").rsplit(".", 1)[-1]
        if act not in ("Identity", "Tanh"):
            raise MTNError(f"{modules['Dense']}: unsupported activation {act!r} (Identity or Tanh)")
        self.activation = None if act == "Identity" else "tanh"
        self.normalize = "Normalize" in modules
        found = [f for f in ("model.safetensors", "pytorch_model.bin") if (modules["Dense"] / f).is_file()]
        if not found:
            raise MTNError(f"{modules['Dense']} holds neither model.safetensors nor pytorch_model.bin")
        weight, bias = _read_linear(modules["Dense"] / found[0], "linear.weight", "linear.bias")
        return modules["Transformer"], "cls" if modes == ["cls_token"] else "mean", weight, bias

    @property
    def projection_dim(self) -> int:
        return int(self.weight.shape[0])

    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """``[N, d_clip]`` embeddings on the CPU (unnormalized unless the folder ends with Normalize)."""
        import torch

        limit = min(self.max_length or 10**9, self.tokenizer.model_max_length)
        limit = limit if limit < 10**6 else None  # tokenizers without a limit report ~1e30
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = [t.lower() if self.lowercase else t for t in texts[i : i + batch_size]]
                enc = self.tokenizer(batch, padding=True, truncation=limit is not None, max_length=limit,
                                     return_tensors="pt").to(self.device)
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                out.append(self._project(self.pool(hidden, enc["attention_mask"], self.pooling)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.projection_dim)

    @staticmethod
    def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
        """``hidden`` [B, L, d], ``mask`` [B, L] -> [B, d]; padding never enters the mean."""
        if pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        import torch

        out = pooled.float() @ self.weight.T  # [B, d_clip]
        out = out if self.bias is None else out + self.bias
        out = torch.tanh(out) if self.activation == "tanh" else out
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


def _read_linear(file: Path, weight_key: str, bias_key: str):
    import torch
    from safetensors.torch import load_file

    state = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                             weights_only=True)
    if weight_key not in state:
        raise MTNError(f"{file} has no {weight_key!r} tensor (has {sorted(state)})")
    return state[weight_key], state.get(bias_key)


def resolve_mclip(spec: str, cache_dir: str | Path, clip_path: str | Path) -> str:
    """``"tiny:mclip"`` -> built once under ``cache_dir`` for the CLIP at ``clip_path``; or a local folder."""
    if spec.startswith(TINY_PREFIX):
        from mtn.tiny.clip import tiny_mclip_folder  # offline stand-in, imported only when asked for

        return tiny_mclip_folder(spec, cache_dir, clip_path)
    folder = Path(spec).expanduser()
    if folder.is_dir() and ((folder / PROJECTION_FILE).is_file() or (folder / "modules.json").is_file()):
        return str(folder)
    raise MTNError(f"multilingual CLIP text encoder {spec!r} is neither 'tiny:mclip' nor a local folder with "
                   f"{PROJECTION_FILE} or a sentence-transformers modules.json; "
                   + _NO_DOWNLOAD.format(hint="sentence-transformers/clip-ViT-B-32-multilingual-v1"))


@functools.lru_cache(maxsize=2)
def _load_mclip(mclip_path: str, device: str) -> MultilingualTextEncoder:
    return MultilingualTextEncoder(mclip_path, device=device)


def multilingual_clip_score(images: list[Image.Image], texts: list[str], clip_path: str, mclip_path: str,
                            batch_size: int = 16, device: str | None = None) -> float:
    """CLIP-S with captions (any language) embedded by the multilingual encoder at ``mclip_path``."""
    _pairs(images, texts)
    image = clip_image_embeds(images, clip_path, batch_size, device)  # [N, d_clip]
    text = _load_mclip(str(mclip_path), _device(device)).encode(texts, batch_size)  # [N, d_clip]
    if text.shape[1] != image.shape[1]:
        raise MTNError(f"{mclip_path} projects to {text.shape[1]} dims but the CLIP model at {clip_path} embeds "
                       f"images in {image.shape[1]}; they must belong together")
    return clip_score_from_embeddings(image, text)
