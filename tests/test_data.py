import gzip

import pytest

from mtn.data import load_pairs, split_train_val
from mtn.errors import MTNError


def test_parallel_files_gz_and_blank_lines(tmp_path):
    src, tgt = tmp_path / "train.de.gz", tmp_path / "train.en"
    with gzip.open(src, "wt") as f:
        f.write("ein Hund\n\nzwei Katzen\n")
    tgt.write_text("a dog\nignored because source is blank\ntwo cats\n")
    assert load_pairs(str(src), str(tgt)) == [("ein Hund", "a dog"), ("zwei Katzen", "two cats")]


def test_monolingual_and_generated(tmp_path):
    (tmp_path / "c.txt").write_text("a red car\n\na blue bird\n")
    assert load_pairs(corpus=str(tmp_path / "c.txt")) == [("a red car", "a red car"), ("a blue bird", "a blue bird")]
    gen = load_pairs(corpus="generated:50")
    assert len(gen) == 50 and gen == load_pairs(corpus="generated:50")


def test_errors(tmp_path):
    with pytest.raises(MTNError, match="corpus file not found: .*missing.txt"):
        load_pairs(corpus=str(tmp_path / "missing.txt"))
    (tmp_path / "a").write_text("1\n2\n3\n")
    (tmp_path / "b").write_text("1\n2\n")
    with pytest.raises(MTNError, match="misaligned: .*a has 3 lines but .*b has 2"):
        load_pairs(str(tmp_path / "a"), str(tmp_path / "b"))
    (tmp_path / "empty").write_text("\n\n")
    with pytest.raises(MTNError, match="no non-empty lines"):
        load_pairs(corpus=str(tmp_path / "empty"))


def test_split_is_deterministic_and_disjoint():
    pairs = [(str(i), str(i)) for i in range(100)]
    tr, va = split_train_val(pairs, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    assert (tr, va) == split_train_val(pairs, 0.1, seed=3)
    assert split_train_val(pairs, 0.1, seed=3, max_val=4)[1] == va[:4]


def test_s3_corpus_through_fsspec(s3_endpoint):
    """Parallel files on S3 (moto's server on loopback), read through the same code path as local files."""
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="corpora")
    s3.put_object(Bucket="corpora", Key="train.de", Body=b"ein Hund\nzwei Katzen\n")
    s3.put_object(Bucket="corpora", Key="train.en.gz", Body=gzip.compress(b"a dog\ntwo cats\n"))
    pairs = load_pairs("s3://corpora/train.de", "s3://corpora/train.en.gz")
    assert pairs == [("ein Hund", "a dog"), ("zwei Katzen", "two cats")]
    with pytest.raises(MTNError, match="not found"):
        load_pairs(corpus="s3://corpora/nope.txt")


def test_multilingual_file_lists_interleave(tmp_path):
    for lang, lines in {"de": "Hund\nKatze\n", "fr": "chien\nchat\n", "en": "dog\ncat\n"}.items():
        (tmp_path / f"t.{lang}").write_text(lines)
    pairs = load_pairs(f"{tmp_path}/t.de,{tmp_path}/t.fr", str(tmp_path / "t.en"))
    assert pairs == [("Hund", "dog"), ("chien", "dog"), ("Katze", "cat"), ("chat", "cat")]


def test_multilingual_rotate_uses_each_target_once(tmp_path):
    for lang, lines in {"de": "Hund\nKatze\nMaus\n", "fr": "chien\nchat\nsouris\n",
                        "en": "dog\ncat\nmouse\n"}.items():
        (tmp_path / f"t.{lang}").write_text(lines)
    pairs = load_pairs(f"{tmp_path}/t.de,{tmp_path}/t.fr", str(tmp_path / "t.en"), mix="rotate")
    assert pairs == [("Hund", "dog"), ("chat", "cat"), ("Maus", "mouse")]  # caption i in language i mod 2


def test_source_lang_all_expands_file_templates():
    from mtn.config import load_config

    cfg = load_config(None, {"source_lang": "all", "languages": ["de", "fr"], "data_root": "/d", "corpus": None,
                             "source_file": "{data_root}/train.{source_lang}", "target_file": "{data_root}/train.en",
                             "name": "run-{source_lang}"})
    assert cfg.source_file == "/d/train.de,/d/train.fr" and cfg.target_file == "/d/train.en"
    assert cfg.name == "run-all"
    with pytest.raises(MTNError, match="needs `languages`"):
        load_config(None, {"source_lang": "all", "languages": ""})
