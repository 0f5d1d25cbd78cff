"""Prompt sets for generation metrics: PartiPrompts (.tsv with a Prompt column), COCO captions json
(`annotations[].caption`), any text file with one prompt per line (.gz, s3:// through fsspec), or `generated:<N>`
/ `generated:<N>:<lang>` (N template prompts in en, de or fr, line-aligned across languages; offline).
A missing PartiPrompts.tsv says the command that downloads it (`mtn data fetch prompts --root <data_root>`)."""

from __future__ import annotations

import csv
import io
import json

import fsspec

from mtn.errors import MTNError


def _read_text(path: str) -> str:
    try:
        with fsspec.open(path, "rt", compression="infer", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        from mtn.data.fetch import fetch_hint

        raise MTNError(f"prompt file not found: {path}{fetch_hint(path)}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise MTNError(f"cannot read prompt file {path}: {e}") from None


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The first `limit` non-empty prompts of a prompt set, in file order (so runs compare prompt for prompt)."""
    if path.startswith("generated:"):
        from mtn.tiny.captions import generate_prompts, parse_generated

        try:
            n, lang = parse_generated(path)
        except ValueError as e:
            raise MTNError(f"prompts {e}") from None
        return generate_prompts(n, lang or "en")[:limit] if limit else generate_prompts(n, lang or "en")
    text = _read_text(path)
    name = path.lower().removesuffix(".gz")
    if name.endswith(".json"):
        try:
            data = json.loads(text)
            prompts = [a["caption"] for a in data["annotations"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MTNError(f"{path}: expected COCO captions json with annotations[].caption") from None
    elif name.endswith(".tsv"):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
        if not rows or "Prompt" not in rows[0]:
            raise MTNError(f"{path}: expected a .tsv with a 'Prompt' column (PartiPrompts format)")
        prompts = [r["Prompt"] or "" for r in rows]
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise MTNError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


def read_parallel(path: str, reference: str | None, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(prompts, English reference prompts): the reference is the prompts themselves when not given."""
    prompts = read_prompts(path, limit)
    if reference is None:
        return prompts, prompts
    ref = read_prompts(reference, limit)
    if len(ref) != len(prompts):
        raise MTNError(f"{reference} gives {len(ref)} prompts but {path} gives {len(prompts)}: line i of one must "
                       "translate line i of the other")
    return prompts, ref
