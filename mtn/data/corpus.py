"""Text corpora for MTN training: monolingual (one file) or parallel (two files aligned by line).

Paths are local or any fsspec URL (s3://bucket/key, with the standard AWS settings / AWS_ENDPOINT_URL);
`.gz` / `.bz2` / `.xz` are decompressed by extension. `generated:<N>` yields N template captions (offline);
`generated:<N>:<lang>` N captions in en, de or fr, line-aligned across languages (a parallel test set, offline).
A missing Multi30k file says the command that downloads it (`mtn data fetch multi30k --root <data_root>`).
A comma list of paths reads as the files one after another; in a parallel corpus, k equally long source files
beside one target file are k translations of it: pairs interleave the languages line by line (`mix="interleave"`,
every caption once per language), or caption i takes language i mod k (`mix="rotate"`: each target caption once,
the languages in equal shares; what the shared multilingual MTN trains on, see jobs/configs/multi30k.yaml).
"""

from __future__ import annotations

import random

import fsspec

from mtn.errors import MTNError


def read_lines(path: str) -> list[str]:
    if "," in path:
        return [line for p in path.split(",") if p.strip() for line in read_lines(p.strip())]
    if path.startswith("generated:"):
        from mtn.tiny.captions import generate_captions, parallel_captions, parse_generated

        try:
            n, lang = parse_generated(path)
        except ValueError as e:
            raise MTNError(f"corpus {e}") from None
        return generate_captions(n) if lang is None else parallel_captions(n, lang)
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        from mtn.data.fetch import fetch_hint

        raise MTNError(f"corpus file not found: {path}{fetch_hint(path)}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise MTNError(f"cannot read corpus file {path}: {e}") from None


def load_pairs(source_file: str | None = None, target_file: str | None = None,
               corpus: str | None = None, mix: str = "interleave") -> list[tuple[str, str]]:
    """(source text, target text) pairs. Parallel files must have the same number of lines; pairs where either
    side is blank are dropped (alignment is by line number, so blanks are kept until pairing)."""
    if corpus:
        lines = read_lines(corpus)
        pairs = [(t, t) for t in lines if t.strip()]
        where = corpus
    else:
        src, tgt = read_lines(source_file), read_lines(target_file)
        n_src, n_tgt = len(source_file.split(",")), len(target_file.split(","))
        if n_tgt == 1 and n_src > 1 and len(src) == n_src * len(tgt):
            # de,fr,cs -> en: interleave line by line (de0, fr0, cs0, de1, ...) so any prefix of the pairs
            # (max_train_samples, max_val_samples) holds every language equally
            per = len(tgt)
            if mix == "rotate":  # caption i in language i mod k: every target once, languages in equal shares
                src = [src[(i % n_src) * per + i] for i in range(per)]
            else:
                src = [src[lang * per + i] for i in range(per) for lang in range(n_src)]
                tgt = [t for t in tgt for _ in range(n_src)]
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


def config_pairs(cfg) -> tuple[list, list]:
    """(train, val) pairs as a TrainConfig defines them; every job that reads a config splits the same way."""
    pairs = load_pairs(cfg.source_file, cfg.target_file, cfg.corpus, getattr(cfg, "language_mix", "interleave"))
    if cfg.val_source_file:  # val always holds every language of each caption (scored per distinct target)
        train, val = pairs, load_pairs(cfg.val_source_file, cfg.val_target_file)[: cfg.max_val_samples]
    else:
        train, val = split_train_val(pairs, cfg.val_fraction, cfg.seed, cfg.max_val_samples)
    return train[: cfg.max_train_samples] if cfg.max_train_samples else train, val


def config_files(cfg, split: str) -> list[str]:
    """The files a split's pairs come from (recorded in feature-cache manifests)."""
    if split == "val" and cfg.val_source_file:
        return [cfg.val_source_file, cfg.val_target_file]
    return [cfg.corpus] if cfg.corpus else [cfg.source_file, cfg.target_file]


def batch_indices(num_rows: int, per_worker: int, rank: int, world: int, seed: int, start_step: int):
    """Row indices of each step's local batch: deterministic per-epoch shuffles, rank r takes every world-th row.
    Starting at `start_step` replays exactly where a resumed run left off."""
    import torch

    per_rank = num_rows // world
    steps_per_epoch = per_rank // per_worker
    if steps_per_epoch < 1:
        raise MTNError(f"{num_rows} training pairs are fewer than one global batch "
                       f"({per_worker * world}); lower batch_size or add data")
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        mine = perm[rank::world][:per_rank]
        for i in range(offset * per_worker, steps_per_epoch * per_worker, per_worker):
            yield mine[i:i + per_worker]
            step += 1
