"""Frozen text encoders: text -> padded hidden states [B, max_length, d] + attention mask [B, max_length].

``load_text_encoder`` builds one from a hub id, a local directory (a checkpoint's bundled encoder) or a
builtin ``tiny:<kind>`` name (seeded, file-free; see ``mtn.tiny``). Heavy imports happen inside
functions, so importing this module touches neither torch hub caches nor the network.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from mtn.errors import MTNError

TINY_PREFIX = "tiny:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" (or a legacy "name")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# Encoders whose diffusion pipelines call them WITHOUT an attention mask (SD 1.x/2.x CLIP, LDM's
# LDMBert): their padding positions are part of what the UNet sees, so we reproduce them exactly.
# CLIP still gets the mask when its config says `use_attention_mask: true` (as diffusers does).
_NO_MASK_MODEL_TYPES = {"clip", "clip_text_model", "ldmbert"}
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model")
_T5_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise MTNError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return _DTYPES[key]


class FrozenTextEncoder(torch.nn.Module):
    """A frozen (no grad, always eval) tokenizer + encoder pair with fixed-length padding."""

    def __init__(
        self, model, tokenizer, name_or_path: str, max_length: int, prefix: str = "", subfolder: str | None = None,
        revision: str | None = None,
    ):
        super().__init__()
        if not isinstance(max_length, int) or max_length < 1:
            raise MTNError(f"max_length must be a positive integer, got {max_length!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = str(name_or_path)
        self.max_length = max_length
        self.prefix = prefix or ""
        self.subfolder = subfolder
        self.revision = revision  # the hub revision asked for (branch, tag or commit); None: main
        self.model.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # A parent module's .train() must not switch dropout on in the frozen encoder.
        super().train(mode)
        self.model.eval()
        return self

    # ---------------------------------------------------------------- properties
    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", "") or "")

    @property
    def hidden_size(self) -> int:
        size = getattr(self.model.config, "hidden_size", None) or getattr(self.model.config, "d_model", None)
        return int(size) if size else int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def passes_attention_mask(self) -> bool:
        """Whether the encoder itself sees the padding mask (see _NO_MASK_MODEL_TYPES)."""
        if self.model_type in _NO_MASK_MODEL_TYPES:
            return bool(getattr(self.model.config, "use_attention_mask", False))
        return True

    # ---------------------------------------------------------------- encoding
    def tokenize(self, texts: list[str], padding: str = "max_length") -> dict[str, torch.Tensor]:
        """input_ids / attention_mask, each [B, max_length] (or [B, longest] with padding="longest")."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise MTNError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise MTNError("texts is empty: need at least one string to encode")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise MTNError(f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        enc = self.tokenizer(
            [self.prefix + t for t in texts],
            padding=padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def forward(self, texts: list[str], zero_pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden [B, max_length, d] in the module's dtype, mask [B, max_length] long, 1 = token).

        zero_pad=True puts zeros at every padded position and, where that is exact (padding masked, or after
        the text under CLIP's causal attention), runs the encoder only up to the batch's longest text: the same
        values wherever mask == 1, several times cheaper on short captions. Use it when padded positions are
        ignored downstream, as the MTN does for its source; the UNet attends to padded target positions, so
        targets keep zero_pad=False.
        """
        # running shorter is exact only when padding cannot reach real tokens: masked, or after them under
        # CLIP's causal attention (an unmasked bidirectional LDM-BERT still runs at max_length)
        shorten = zero_pad and (self.passes_attention_mask or self.model_type in ("clip", "clip_text_model"))
        enc = self.tokenize(texts, padding="longest" if shorten else "max_length")
        ids, mask = enc["input_ids"], enc["attention_mask"]  # [B, L], [B, L]; L = max_length unless zero_pad
        with torch.no_grad():
            kwargs = {"attention_mask": mask} if self.passes_attention_mask else {}
            out = self.model(input_ids=ids, **kwargs, return_dict=True)
        hidden = out.last_hidden_state  # [B, L, d]
        if zero_pad:
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # zeros wherever mask == 0, as documented
        if (pad := self.max_length - hidden.shape[1]) > 0:
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad))  # [B, max_length, d], zeros after L
            mask = torch.nn.functional.pad(mask, (0, pad))  # [B, max_length]
        return hidden, mask.long()

    # ---------------------------------------------------------------- persistence
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description, enough for load_text_encoder(**...) to rebuild it."""
        return {
            "name_or_path": self.name_or_path,
            "subfolder": self.subfolder,
            "hub_revision": self.revision,
            "max_length": self.max_length,
            "prefix": self.prefix,
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write model + tokenizer with save_pretrained; load_text_encoder(directory, ...) reads them back."""
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return str(directory)

    def extra_repr(self) -> str:
        return f"name_or_path={self.name_or_path!r}, max_length={self.max_length}, hidden_size={self.hidden_size}"


# ---------------------------------------------------------------------------- loading


def _is_local(name_or_path: str) -> bool:
    return os.path.isdir(name_or_path)


def _check_source(name_or_path: str) -> None:
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise MTNError(f"text encoder name_or_path must be a non-empty string, got {name_or_path!r}")
    if _is_local(name_or_path):
        return
    looks_local = name_or_path.startswith((".", "/", "~", "\\")) or name_or_path.count("/") > 1
    if looks_local or not _HUB_ID.match(name_or_path):
        if os.path.exists(name_or_path):
            raise MTNError(f"text encoder path {name_or_path!r} is a file; expected a model directory")
        raise MTNError(f"text encoder path {name_or_path!r} does not exist (and is not a hub id 'org/name')")


def _revision_kw(revision: str | None) -> dict[str, Any]:
    return {"revision": revision} if revision else {}


def _read_model_type(name_or_path: str, subfolder: str | None, trust_remote_code: bool,
                     revision: str | None = None) -> str:
    """model_type from config.json without AutoConfig (which rejects types it doesn't know, e.g. ldmbert)."""
    from transformers import PretrainedConfig

    try:
        cfg, _ = PretrainedConfig.get_config_dict(name_or_path, subfolder=subfolder or "", **_revision_kw(revision))
    except OSError as e:
        raise MTNError(
            f"cannot read the config of text encoder {name_or_path!r}"
            f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {e}"
        ) from e
    return str(cfg.get("model_type", ""))


def _load_model(
    name_or_path: str, subfolder: str | None, model_type: str, torch_dtype: torch.dtype, trust_remote_code: bool,
    revision: str | None = None,
):
    import transformers

    kw: dict[str, Any] = {"dtype": torch_dtype, **_revision_kw(revision)}
    if subfolder:
        kw["subfolder"] = subfolder
    if model_type in _T5_CLASSES:
        cls = getattr(transformers, _T5_CLASSES[model_type])  # encoder stack only
    elif model_type in ("clip", "clip_text_model"):
        cls = transformers.CLIPTextModel
    elif model_type == "ldmbert":
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

        cls = LDMBertModel
    else:
        cls = transformers.AutoModel
        kw["trust_remote_code"] = trust_remote_code
    model = cls.from_pretrained(name_or_path, **kw)
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return model


def _load_tokenizer(name_or_path: str, subfolder: str | None, tokenizer_subfolder: str | None, trust_remote_code: bool,
                    revision: str | None = None, config=None):
    """`config`: the encoder's config. AutoTokenizer otherwise reads a config.json beside the tokenizer first, which
    a diffusers repo's tokenizer/ lacks: offline, from a cache that never recorded that file as missing (one filled
    by snapshot_download or diffusers), that read fails although every tokenizer file is there."""
    from transformers import AutoTokenizer

    if tokenizer_subfolder is not None:
        candidates = [tokenizer_subfolder]
    elif subfolder:
        candidates = [subfolder, "tokenizer"]  # e.g. diffusers repos: text_encoder/ + tokenizer/
    else:
        candidates = [""]
    errors = []
    for sub in candidates:
        if _is_local(name_or_path) and not any(
            os.path.exists(os.path.join(name_or_path, sub, f)) for f in _TOKENIZER_FILES
        ):
            errors.append(f"{sub or '.'!r}: no tokenizer files")
            continue
        try:
            kw = {"config": config} if config is not None and sub != (subfolder or "") else {}
            return AutoTokenizer.from_pretrained(name_or_path, subfolder=sub, trust_remote_code=trust_remote_code,
                                                 **_revision_kw(revision), **kw)
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{sub or '.'!r}: {e}")
    raise MTNError(f"cannot load a tokenizer for {name_or_path!r}: " + "; ".join(errors))


def load_text_encoder(
    name_or_path: str,
    max_length: int,
    prefix: str = "",
    subfolder: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    tokenizer_subfolder: str | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> FrozenTextEncoder:
    """A FrozenTextEncoder from ``tiny:<t5|clip|bert|xlmr>``, a local directory or a hub id.

    ``tokenizer_subfolder``: where the tokenizer lives; by default next to the model, and when
    ``subfolder`` is given and has none, in "tokenizer" (CompVis/ldm-text2im-large-256 uses
    subfolder="bert"). ``seed`` only matters for ``tiny:`` encoders. ``revision``: the hub branch, tag or commit
    of the model, its tokenizer and its config (None: main; ignored for local folders and ``tiny:``); recorded in
    ``spec()`` as ``hub_revision``.
    """
    torch_dtype = resolve_dtype(dtype)
    if isinstance(name_or_path, str) and name_or_path.startswith(TINY_PREFIX):
        from mtn.tiny.encoders import tiny_text_encoder  # offline stand-in, imported only when asked for

        model, tok = tiny_text_encoder(name_or_path, max_length, seed=seed)
    else:
        _check_source(name_or_path)
        model_type = _read_model_type(name_or_path, subfolder, trust_remote_code, revision)
        try:
            model = _load_model(name_or_path, subfolder, model_type, torch_dtype, trust_remote_code, revision)
        except OSError as e:
            raise MTNError(f"cannot load text encoder {name_or_path!r}"
                           f"{f' at revision {revision!r}' if revision else ''}: {e}") from e
        tok = _load_tokenizer(name_or_path, subfolder, tokenizer_subfolder, trust_remote_code, revision, model.config)
        _check_max_length(model, max_length, name_or_path)
    model = model.to(device=device, dtype=torch_dtype)
    return FrozenTextEncoder(model, tok, name_or_path, max_length, prefix=prefix, subfolder=subfolder,
                             revision=revision or None)


def _check_max_length(model, max_length: int, name: str) -> None:
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if not limit or cfg.model_type in _T5_CLASSES:
        return
    if cfg.model_type in ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"):
        limit -= 2  # positions start after padding_idx
    if max_length > limit:
        raise MTNError(f"max_length {max_length} exceeds {name!r}'s limit of {limit} positions")
