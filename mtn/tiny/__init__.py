"""Offline stand-ins: tiny, seeded, file-free models and data for tests and the local default jobs.

Nothing here downloads or reads weights; every builder is deterministic in its seed. Production modules reach
this package only through a lazy hook on a ``tiny:`` reference (``tiny:t5`` in ``mtn.encoders``, ``tiny:sd`` in
``mtn.pipeline``, ``tiny:clip-vit`` / ``tiny:mclip`` in ``mtn.eval.clip``, ``tiny`` FID features in
``mtn.eval.fid``, ``generated:<N>`` corpora in ``mtn.data.corpus``).

    captions.py    TINY_CORPUS (en/de/fr captions), generate_captions, parallel_captions (aligned en/de/fr), generate_prompts
    tokenizers.py  deterministic CLIP/BERT/XLM-R tokenizers trained on TINY_CORPUS, ByT5 for t5
    encoders.py    tiny T5/CLIP/BERT/XLM-R text encoders (``tiny:<kind>``)
    clip.py        toy CLIP and multilingual-CLIP folders for the evaluation metrics
    fid.py         a small seeded conv net as FID feature extractor
    sd.py          a tiny Stable Diffusion pipeline whose text encoder is ``tiny:clip``
    translator.py  an untrained seeded translator
    shards.py      toy webdataset shards in img2dataset's layout (painted images, template captions)

The family's sizes live here because tokenizers, encoders, CLIP and SD share them. Hidden sizes differ on
purpose so that source and target dimensions never coincide by accident.
"""

TINY_KINDS = ("t5", "clip", "bert", "xlmr")
TINY_HIDDEN_SIZES = {"t5": 32, "clip": 48, "bert": 40, "xlmr": 40}
# Longest max_length a tiny encoder accepts (position tables); T5 is relative, so unbounded.
TINY_MAX_POSITIONS = {"t5": None, "clip": 77, "bert": 128, "xlmr": 128}
