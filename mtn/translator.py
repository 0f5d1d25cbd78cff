"""Translator = frozen source LM + MTN encoder -> target-space prompt embeddings; and its checkpoint folder.

A translator folder (what `jobs/train_mtn.py` writes at `<output_dir>/translator`) is self-describing:

    translator.json            format, source/target encoder specs (id or path, max_length, prefix, ...), the
                               declared target space (target_space: the text space it writes, see below),
                               training metadata (config, steps, final metrics)
    mtn/config.json            ModelTranslationNetwork config (save_pretrained)
    mtn/diffusion_pytorch_model.safetensors
    source_encoder/            optional bundled copy of the source LM (model + tokenizer)

    >>> from mtn import load_translator
    >>> tr = load_translator("outputs/local/translator")
    >>> emb = tr.encode(["ein Hund rennt am Strand"])        # [B, S_t, d_t]
    >>> pipe(prompt_embeds=emb, negative_prompt_embeds=tr.encode([""]))

The target space is what a consumer checks before use (mtn.pipeline.check_translator, the registry tags of
jobs/train_mtn.py): {encoder: id or path, subfolder, revision (the pinned hub revision; null = main), width: d_t,
length: S_t, padding: "max_length"}. Folders written before it was recorded derive it from their target_encoder spec
and their model config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mtn.encoders import FrozenTextEncoder, load_text_encoder
from mtn.errors import MTNError
from mtn.model import ModelTranslationNetwork


def _model_classes() -> dict:
    from mtn.baselines import LinearTranslationMap, PooledLinearMap

    return {c.__name__: c for c in (ModelTranslationNetwork, LinearTranslationMap, PooledLinearMap)}

FORMAT = "mtn-translator"
VERSION = 1
MANIFEST = "translator.json"
MTN_SUBFOLDER = "mtn"
BUNDLED_ENCODER = "source_encoder"
WEIGHTS = "diffusion_pytorch_model.safetensors"
TARGET_PADDING = "max_length"  # the target encoder always pads to S_t, as Stable Diffusion's tokenizer does


def target_space_of(manifest: dict, model_config) -> dict:
    """The text space a translator writes, from its target_encoder spec and its model config (an object or the
    config.json mapping): {encoder, subfolder, revision, width (d_t), length (S_t), padding}."""
    spec = manifest.get("target_encoder") or {}
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k)
    return {"encoder": spec.get("name_or_path"), "subfolder": spec.get("subfolder"),
            "revision": spec.get("hub_revision"), "width": int(get("target_dim")), "length": int(get("target_len")),
            "padding": TARGET_PADDING}


def target_space_tags(space: dict) -> dict[str, str]:
    """Registry tags of a translator's model version, so a consumer can check the text space without downloading:
    mtn.target_encoder, mtn.target_width, mtn.target_length (+ mtn.target_subfolder / mtn.target_revision if set)."""
    tags = {"mtn.target_encoder": str(space["encoder"]), "mtn.target_width": str(space["width"]),
            "mtn.target_length": str(space["length"])}
    tags.update({f"mtn.target_{k}": str(space[k]) for k in ("subfolder", "revision") if space.get(k)})
    return tags


def read_target_space(path: str | Path) -> dict:
    """A translator folder's target space without loading its weights (the recorded one, else derived)."""
    path = Path(path)
    manifest = read_translator_manifest(path)
    if isinstance(manifest.get("target_space"), dict):
        return manifest["target_space"]
    try:
        config = json.loads((path / MTN_SUBFOLDER / "config.json").read_text())
    except ValueError as e:
        raise MTNError(f"{path / MTN_SUBFOLDER / 'config.json'} is not valid JSON: {e}") from None
    return target_space_of(manifest, config)


class Translator:
    """Runs the source LM and the MTN encoder: prompts -> [B, S_t, d_t] embeddings for `prompt_embeds`."""

    def __init__(self, source_encoder: FrozenTextEncoder, mtn, manifest: dict | None = None):
        """`mtn`: a ModelTranslationNetwork, or a baseline from mtn.baselines (same encode interface)."""
        if source_encoder.hidden_size != mtn.config.source_dim or source_encoder.max_length != mtn.config.source_len:
            raise MTNError(
                f"source encoder gives [*, {source_encoder.max_length}, {source_encoder.hidden_size}] but the MTN "
                f"expects [*, {mtn.config.source_len}, {mtn.config.source_dim}]")
        self.source_encoder = source_encoder
        self.mtn = mtn.eval()
        self.manifest = manifest or {}

    @property
    def target_shape(self) -> tuple[int, int]:
        return self.mtn.config.target_len, self.mtn.config.target_dim

    @property
    def target_space(self) -> dict:
        """{encoder, subfolder, revision, width, length, padding}: the text space these embeddings live in (the
        manifest's record; derived from the target_encoder spec + the model config for older folders)."""
        recorded = self.manifest.get("target_space")
        return dict(recorded) if isinstance(recorded, dict) else target_space_of(self.manifest, self.mtn.config)

    def to(self, device=None, dtype=None) -> Translator:
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        self.source_encoder.to(**kw)
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (even with no fp32-only modules)
        torch.nn.Module.to(self.mtn, **kw)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """prompts -> [B, S_t, d_t] in the MTN's dtype/device, ready for a diffusers pipeline's prompt_embeds.
        The empty string is a valid prompt (it gives the unconditional embedding for classifier-free guidance)."""
        if isinstance(prompts, str):
            raise MTNError("encode() takes a list of prompts, not a single string: use encode([prompt])")
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise MTNError("encode() needs a non-empty list of prompt strings")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise MTNError(f"prompts must be strings; items {bad[:5]} are not")
        p = next(self.mtn.parameters())
        # length-sorted batches: the LM runs up to each batch's longest prompt, so similar lengths waste nothing
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = None
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            # zero_pad: the MTN masks padded positions, so the LM need only run up to the longest prompt
            hidden, mask = self.source_encoder([prompts[j] for j in idx], zero_pad=True)  # [b,S_s,d_s],[b,S_s]
            emb = self.mtn.encode(hidden.to(p.device, p.dtype), mask.to(p.device))  # [b, S_t, d_t]
            if out is None:
                out = emb.new_empty(len(prompts), *emb.shape[1:])  # [B, S_t, d_t]
            out[torch.tensor(idx, device=emb.device)] = emb
        return out  # [B, S_t, d_t] in the order of `prompts`

    def save(self, path: str | Path, bundle_source_encoder: bool = False, training: dict | None = None) -> Path:
        path = Path(path)
        if bundle_source_encoder:
            self.source_encoder.save(path / BUNDLED_ENCODER)
        self.manifest = save_translator_folder(path, self.mtn, {**self.manifest, "source_encoder": self.source_encoder.spec(),
                                               "bundled_source_encoder": bool(bundle_source_encoder)}, training)
        return path


def save_translator_folder(path: str | Path, model, manifest: dict, training: dict | None = None) -> dict:
    """Write the model + translator.json without a loaded source LM (what a job trained from cached features
    has): `manifest` names source_encoder and target_encoder specs (name_or_path, max_length, prefix, ...)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path / MTN_SUBFOLDER)
    manifest = {"bundled_source_encoder": False, **manifest, "format": FORMAT, "version": VERSION,
                "model_class": type(model).__name__, "target_space": target_space_of(manifest, model.config)}
    if training is not None:
        manifest["training"] = training
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def read_translator_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise MTNError(f"translator folder not found: {path}")
    missing = [str(f.relative_to(path)) for f in (path / MANIFEST, path / MTN_SUBFOLDER / "config.json",
                                                   path / MTN_SUBFOLDER / WEIGHTS) if not f.is_file()]
    if missing:
        raise MTNError(f"{path} is not a complete translator folder: missing {', '.join(missing)}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except ValueError as e:
        raise MTNError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise MTNError(f"{path / MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version", 0) > VERSION:
        raise MTNError(f"{path} was written by a newer mtn (format version {manifest['version']} > {VERSION})")
    for key in ("source_encoder", "target_encoder"):
        if not isinstance(manifest.get(key), dict) or "name_or_path" not in manifest[key]:
            raise MTNError(f"{path / MANIFEST} lacks the '{key}' reference (name_or_path, max_length, ...)")
    return manifest


def load_translation_model(path: str | Path, manifest: dict | None = None):
    """Only the translation model of a translator folder (MTN or baseline), for scoring cached features."""
    path = Path(path)
    manifest = manifest or read_translator_manifest(path)
    classes = _model_classes()
    name = manifest.get("model_class", "ModelTranslationNetwork")
    if name not in classes:
        raise MTNError(f"{path / MANIFEST}: unknown model_class {name!r} (known: {', '.join(classes)})")
    return classes[name].from_pretrained(path / MTN_SUBFOLDER).eval()


def load_translator(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    source_encoder: FrozenTextEncoder | str | None = None) -> Translator:
    """Load a translator folder. `source_encoder` overrides the recorded source LM (an encoder or a path),
    e.g. when the hub id in the manifest is mirrored locally."""
    path = Path(path)
    manifest = read_translator_manifest(path)
    spec = manifest["source_encoder"]
    if not isinstance(source_encoder, FrozenTextEncoder):
        where = source_encoder or (str(path / BUNDLED_ENCODER) if manifest.get("bundled_source_encoder")
                                   else spec["name_or_path"])
        recorded = where == spec["name_or_path"]  # the manifest's hub id / path (not the bundle or an override)
        source_encoder = load_text_encoder(where, max_length=spec["max_length"], prefix=spec.get("prefix", ""),
                                           subfolder=spec.get("subfolder") if recorded else None,
                                           revision=spec.get("hub_revision") if recorded else None, device=device)
    mtn = load_translation_model(path, manifest)
    return Translator(source_encoder, mtn, manifest).to(device=device, dtype=dtype)
