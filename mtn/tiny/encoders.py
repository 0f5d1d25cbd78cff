"""Tiny seeded text encoders for ``tiny:<t5|clip|bert|xlmr>``: weights from ``torch.manual_seed(seed)`` right
before construction, tokenizers from mtn.tiny.tokenizers; nothing is read from disk."""

from __future__ import annotations

from mtn.errors import MTNError
from mtn.tiny import TINY_HIDDEN_SIZES, TINY_KINDS, TINY_MAX_POSITIONS
from mtn.tiny.tokenizers import build_tiny_tokenizer


def tiny_text_encoder(ref: str, max_length: int, seed: int = 0):
    """``(model, tokenizer)`` for a ``tiny:<kind>`` reference (what mtn.encoders.load_text_encoder dispatches
    here); a user error for an unknown kind or a max_length over the kind's position table."""
    kind = ref.partition(":")[2]
    if kind not in TINY_KINDS:
        raise MTNError(f"unknown builtin encoder {ref!r}; use one of " + ", ".join(f"tiny:{k}" for k in TINY_KINDS))
    limit = TINY_MAX_POSITIONS[kind]
    if limit is not None and max_length > limit:
        raise MTNError(f"max_length {max_length} exceeds {ref}'s limit of {limit} tokens")
    return build_tiny_encoder(kind, seed=seed)


def _bert_like(n_vocab: int, d: int, tok) -> dict:
    """Shared sizes of the tiny BERT and XLM-R configs (2 layers, 2 heads, no dropout)."""
    return dict(vocab_size=n_vocab, hidden_size=d, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)


def build_tiny_encoder(kind: str, seed: int = 0):
    """``(model, tokenizer)`` for kind in {"t5", "clip", "bert", "xlmr"}; weights from ``seed``."""
    import torch

    tok = build_tiny_tokenizer(kind)
    d = TINY_HIDDEN_SIZES[kind]
    n_vocab = len(tok)
    if kind == "t5":
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(
            vocab_size=n_vocab,
            d_model=d,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = T5EncoderModel(cfg)
    elif kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(
            vocab_size=n_vocab,
            hidden_size=d,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_POSITIONS["clip"],
            projection_dim=d,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = CLIPTextModel(cfg)
    elif kind == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(max_position_embeddings=TINY_MAX_POSITIONS["bert"], **_bert_like(n_vocab, d, tok))
        torch.manual_seed(seed)
        model = BertModel(cfg)
    elif kind == "xlmr":
        from transformers import XLMRobertaConfig, XLMRobertaModel

        # RoBERTa positions start after padding_idx: the table needs max_length + 2 rows.
        cfg = XLMRobertaConfig(max_position_embeddings=TINY_MAX_POSITIONS["xlmr"] + 2, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, **_bert_like(n_vocab, d, tok))
        torch.manual_seed(seed)
        model = XLMRobertaModel(cfg)
    else:  # build_tiny_tokenizer already rejected it
        raise AssertionError(kind)
    model.eval()
    return model, tok
