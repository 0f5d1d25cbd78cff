"""An untrained, seeded translator: a stand-in where a trained one is not needed."""

from __future__ import annotations

import torch

from mtn.encoders import load_text_encoder
from mtn.model import ModelTranslationNetwork
from mtn.translator import Translator


def build_tiny_translator(target_dim: int = 48, target_len: int = 77, source_len: int = 16, seed: int = 0):
    """An untrained translator (tiny:t5 bytes -> MTN -> [*, target_len, target_dim]), seeded: a stand-in where a
    trained one is not needed (tests, the finetune job's tiny default)."""
    source = load_text_encoder("tiny:t5", max_length=source_len)
    torch.manual_seed(seed)
    mtn = ModelTranslationNetwork(source_dim=source.hidden_size, target_dim=target_dim, source_len=source_len,
                                  target_len=target_len, num_modules=1, hidden_dim=32)
    target_spec = {"name_or_path": "tiny:clip", "max_length": target_len, "prefix": ""}
    return Translator(source, mtn, {"target_encoder": target_spec})
