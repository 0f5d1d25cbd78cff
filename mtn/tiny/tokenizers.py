"""Tiny tokenizers trained in-process on TINY_CORPUS (deterministic, no files); ByT5 needs no training at all."""

from __future__ import annotations

from mtn.tiny import TINY_KINDS, TINY_MAX_POSITIONS
from mtn.tiny.captions import TINY_CORPUS

# `tokenizers`' own trainers break frequency ties through randomly seeded hash maps, so two trainings
# in one process can give different vocabularies. This small BPE learner breaks ties by the pair's
# text instead: same corpus -> same vocab and merges, every call.


def _learn_bpe(words: list[list[str]], n_merges: int, join) -> list[tuple[str, str]]:
    """Greedy BPE over pre-split words (lists of initial symbols); ``join(a, b)`` builds the merged symbol."""
    counts: dict[tuple[str, ...], int] = {}
    for w in words:
        counts[tuple(w)] = counts.get(tuple(w), 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, c in counts.items():
            for p in zip(w, w[1:], strict=False):
                pairs[p] = pairs.get(p, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then alphabetical
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = join(*best)
        new_counts: dict[tuple[str, ...], int] = {}
        for w, c in counts.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    return merges


def _extra_chars() -> list[str]:
    import string

    return sorted(set(string.ascii_letters + string.digits + string.punctuation))


def _tiny_clip_tokenizer():
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    # Same normalizer / pre-tokenizer as transformers' CLIPTokenizer builds around vocab + merges.
    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = [
        list(w[:-1]) + [w[-1] + "</w>"] for s in TINY_CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(s))
    ]
    merges = _learn_bpe(words, 400, lambda a, b: a + b)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # CLIP's layout: bytes, bytes + "</w>", merged symbols, then the two specials.
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    # transformers 5: vocab=dict, merges=list[tuple]; `vocab_file=` would silently give 2 tokens.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_MAX_POSITIONS["clip"])


def _tiny_bert_tokenizer():
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = [
        [w[0]] + ["##" + c for c in w[1:]] for s in TINY_CORPUS for w, _ in pre.pre_tokenize_str(norm.normalize_str(s))
    ]
    merges = _learn_bpe(words, 300, lambda a, b: a + b[2:])  # "ro" + "##t" -> "rot"
    chars = sorted({c.lower() for c in _extra_chars()} | {c for w in words for c in w[0]})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    tokens += [a + b[2:] for a, b in merges]
    return BertTokenizer(
        vocab={t: i for i, t in enumerate(dict.fromkeys(tokens))}, model_max_length=TINY_MAX_POSITIONS["bert"]
    )


def _tiny_xlmr_tokenizer():
    import math

    from transformers import XLMRobertaTokenizer

    words = [["▁"] + list(w) for s in TINY_CORPUS for w in s.split()]
    merges = _learn_bpe(words, 300, lambda a, b: a + b)
    pieces = list(
        dict.fromkeys(["▁"] + sorted({c for w in words for c in w} | set(_extra_chars())) + [a + b for a, b in merges])
    )
    # Unigram log-probabilities from how often each piece occurs inside the corpus words.
    text = " ".join("▁" + w for s in TINY_CORPUS for w in s.split())
    freq = {p: text.count(p) + 1 for p in pieces}
    total = sum(freq.values())
    # XLMRobertaTokenizer hard-codes unk_id=3, so the specials must come first, in exactly this order.
    vocab = [(t, 0.0) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]
    vocab += [(p, math.log(freq[p] / total)) for p in pieces]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=TINY_MAX_POSITIONS["xlmr"])


def build_tiny_tokenizer(kind: str):
    """The tokenizer alone (deterministic; no model weights)."""
    if kind == "t5":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()  # needs no files; vocab size is len(tok) == 384, not vocab_size
    if kind == "clip":
        return _tiny_clip_tokenizer()
    if kind == "bert":
        return _tiny_bert_tokenizer()
    if kind == "xlmr":
        return _tiny_xlmr_tokenizer()
    raise ValueError(f"unknown tiny encoder kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")

