"""Text corpora for MTN training: monolingual (one file) or parallel (two files aligned by line).

Paths are local or any fsspec URL (s3://bucket/key, with the standard AWS settings / AWS_ENDPOINT_URL);
`.gz` / `.bz2` / `.xz` are decompressed by extension. `generated:<N>` yields N template captions (offline).
"""

from __future__ import annotations

import random

import fsspec

from mtn.errors import MTNError


def read_lines(path: str) -> list[str]:
    if path.startswith("generated:"):
        from mtn.tiny import generate_captions

        try:
            n = int(path.split(":", 1)[1])
        except ValueError:
            raise MTNError(f"corpus {path!r}: expected generated:<number of captions>") from None
        return generate_captions(n)
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise MTNError(f"corpus file not found: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise MTNError(f"cannot read corpus file {path}: {e}") from None


def load_pairs(source_file: str | None = None, target_file: str | None = None,
               corpus: str | None = None) -> list[tuple[str, str]]:
    """(source text, target text) pairs. Parallel files must have the same number of lines; pairs where either
    side is blank are dropped (alignment is by line number, so blanks are kept until pairing)."""
    if corpus:
        lines = read_lines(corpus)
        pairs = [(t, t) for t in lines if t.strip()]
        where = corpus
    else:
        src, tgt = read_lines(source_file), read_lines(target_file)
        if len(src) != len(tgt):
            raise MTNError(f"parallel files are misaligned: {source_file} has {len(src)} lines but "
                           f"{target_file} has {len(tgt)}; line i of one must translate line i of the other")
        pairs = [(s, t) for s, t in zip(src, tgt, strict=False) if s.strip() and t.strip()]
        where = f"{source_file} + {target_file}"
    if not pairs:
        raise MTNError(f"corpus {where} holds no non-empty lines")
    return pairs


def split_train_val(pairs: list, val_fraction: float, seed: int, max_val: int | None = None):
    """Deterministic shuffle-split; the same (pairs, fraction, seed) gives the same split on every worker."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(pairs) * val_fraction))
    if max_val is not None:
        n_val = min(n_val, max_val)
    if len(pairs) - n_val < 1:
        raise MTNError(f"corpus too small: {len(pairs)} pairs leave nothing to train on after the val split")
    return [pairs[i] for i in idx[n_val:]], [pairs[i] for i in idx[:n_val]]
