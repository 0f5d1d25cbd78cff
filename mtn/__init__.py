"""MTN: plug new language models into existing text-to-image diffusion models (GlueGen's Model Translation Network).

Public API (imported lazily, so `import mtn` stays cheap):
    load_translator, Translator, ModelTranslationNetwork, TokenDiscriminator, load_text_encoder, MTNError
"""

from mtn.errors import MTNError

_LAZY = {
    "load_translator": "mtn.translator",
    "Translator": "mtn.translator",
    "ModelTranslationNetwork": "mtn.model",
    "TokenDiscriminator": "mtn.model",
    "load_text_encoder": "mtn.encoders",
    "FrozenTextEncoder": "mtn.encoders",
}

__all__ = ["MTNError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtn' has no attribute {name!r}")
