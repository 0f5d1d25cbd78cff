"""Tiny, deterministic, file-free text encoders and captions for tests and the local default job.

Everything here is built offline: tokenizers are trained in-process on ``TINY_CORPUS`` (fast and
deterministic), model weights come from ``torch.manual_seed(seed)`` right before construction.
Hidden sizes differ on purpose so that source and target dimensions never coincide by accident.
"""

from __future__ import annotations

import random

TINY_KINDS = ("t5", "clip", "bert", "xlmr")
TINY_HIDDEN_SIZES = {"t5": 32, "clip": 48, "bert": 40, "xlmr": 40}
# Longest max_length a tiny encoder accepts (position tables); T5 is relative, so unbounded.
TINY_MAX_POSITIONS = {"t5": None, "clip": 77, "bert": 128, "xlmr": 128}

# ~100 simple captions in English, German and French (the tokenizer training corpus).
TINY_CORPUS: list[str] = [
    # English
    "a red dog runs on the beach",
    "a black cat sleeps on the sofa",
    "two children play in the park",
    "a man rides a bicycle down the street",
    "a woman reads a book under a tree",
    "a small boat sails on a calm lake",
    "a yellow bird sits on a branch",
    "an old house stands next to the river",
    "a green car is parked in front of a shop",
    "a brown horse eats grass in a field",
    "the sun sets behind the mountains",
    "a white dog jumps over a fence",
    "a group of people walk across the bridge",
    "a blue train arrives at the station",
    "a little girl holds a red balloon",
    "a cup of coffee on a wooden table",
    "a plate of pasta with tomato sauce",
    "a cat looks out of the window",
    "snow covers the trees in the forest",
    "a painting of a squirrel eating a burger",
    "a photo of an astronaut riding a horse",
    "a city street at night with bright lights",
    "a dog and a cat sleep together",
    "a boy throws a ball to his dog",
    "a large ship in the harbor",
    "flowers in a glass vase on the table",
    "a cow stands in a green meadow",
    "a man cooks dinner in the kitchen",
    "a red apple and a yellow banana",
    "a bird flies over the sea",
    "an orange cat on a blue chair",
    "a family has a picnic in the garden",
    "a tall tower in the old town",
    "rain falls on the empty road",
    "a child draws a house with a crayon",
    "a fox runs through the snowy field",
    "a dog swims in the lake",
    # German
    "ein roter hund läuft am strand",
    "eine schwarze katze schläft auf dem sofa",
    "zwei kinder spielen im park",
    "ein mann fährt fahrrad auf der straße",
    "eine frau liest ein buch unter einem baum",
    "ein kleines boot segelt auf einem ruhigen see",
    "ein gelber vogel sitzt auf einem ast",
    "ein altes haus steht neben dem fluss",
    "ein grünes auto parkt vor einem laden",
    "ein braunes pferd frisst gras auf einer wiese",
    "die sonne geht hinter den bergen unter",
    "ein weißer hund springt über einen zaun",
    "eine gruppe von menschen geht über die brücke",
    "ein blauer zug kommt am bahnhof an",
    "ein kleines mädchen hält einen roten ballon",
    "eine tasse kaffee auf einem holztisch",
    "ein teller nudeln mit tomatensoße",
    "eine katze schaut aus dem fenster",
    "schnee bedeckt die bäume im wald",
    "ein hund und eine katze schlafen zusammen",
    "ein junge wirft seinem hund einen ball zu",
    "ein großes schiff im hafen",
    "blumen in einer vase auf dem tisch",
    "eine kuh steht auf einer grünen wiese",
    "ein mann kocht das abendessen in der küche",
    "ein vogel fliegt über das meer",
    "eine familie macht ein picknick im garten",
    "regen fällt auf die leere straße",
    "ein fuchs läuft durch das verschneite feld",
    "ein hund schwimmt im see",
    # French
    "un chien rouge court sur la plage",
    "un chat noir dort sur le canapé",
    "deux enfants jouent dans le parc",
    "un homme fait du vélo dans la rue",
    "une femme lit un livre sous un arbre",
    "un petit bateau navigue sur un lac calme",
    "un oiseau jaune est assis sur une branche",
    "une vieille maison se trouve près de la rivière",
    "une voiture verte est garée devant un magasin",
    "un cheval brun mange de l'herbe dans un champ",
    "le soleil se couche derrière les montagnes",
    "un chien blanc saute par-dessus une clôture",
    "un groupe de personnes traverse le pont",
    "un train bleu arrive à la gare",
    "une petite fille tient un ballon rouge",
    "une tasse de café sur une table en bois",
    "une assiette de pâtes à la sauce tomate",
    "un chat regarde par la fenêtre",
    "la neige couvre les arbres de la forêt",
    "un chien et un chat dorment ensemble",
    "un garçon lance une balle à son chien",
    "un grand navire dans le port",
    "des fleurs dans un vase sur la table",
    "une vache dans un pré vert",
    "un homme prépare le dîner dans la cuisine",
    "un oiseau vole au-dessus de la mer",
    "une famille pique-nique dans le jardin",
    "la pluie tombe sur la route vide",
    "un renard court dans le champ enneigé",
    "un chien nage dans le lac",
    "une photo d'un astronaute à cheval",
]

_COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "small", "big"]
_SUBJECTS = ["dog", "cat", "horse", "bird", "cow", "fox", "boy", "girl", "man", "woman", "car", "boat"]
_VERBS = ["runs", "sleeps", "sits", "stands", "plays", "waits", "jumps", "rests"]
_PLACES = [
    "on the beach",
    "in the park",
    "on the street",
    "in a field",
    "near the river",
    "in the snow",
    "under a tree",
    "in the garden",
    "on a hill",
    "next to a house",
]
_TIMES = ["", "", "at night", "in the morning", "at sunset", "in the rain"]


def generate_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` simple deterministic English captions, e.g. "a red dog runs on the beach"."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [
            "a",
            rng.choice(_COLORS),
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_PLACES),
            rng.choice(_TIMES),
        ]
        out.append(" ".join(w for w in words if w))
    return out


# --------------------------------------------------------------------------- tokenizers
# `tokenizers`' own trainers break frequency ties through randomly seeded hash maps, so two trainings
# in one process can give different vocabularies. This small BPE learner breaks ties by the pair's
# text instead: same corpus -> same vocab and merges, every call (~0.1 s on TINY_CORPUS).


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


# --------------------------------------------------------------------------- models


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
