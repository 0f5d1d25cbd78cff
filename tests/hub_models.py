"""Hub-shaped stand-ins at the real widths: the folders of XLM-R large and Stable Diffusion 1.5 as their hub repos
lay them out, with the real model classes at the real hidden sizes (1024, 768, 77 positions), tiny in depth, built
from configs with seeded weights and tokenizers learned here; and a Hugging Face cache populated with them, so that
hub ids resolve offline (HF_HUB_OFFLINE=1) exactly as a node with a pre-populated cache resolves them.

    xlmr_large_like(path)                          FacebookAI/xlm-roberta-large: XLMRobertaModel 1024-d + tokenizer
    sd15_like(path)                                stable-diffusion-v1-5/...: CLIP 768-d, UNet cross-attn 768, ...
    untrained_translator_folder(path, source_id)   an MTN translator folder: source 1024-d -> 77 x 768
    populate_hf_cache(hf_home, repo_id, folder)    <hf_home>/hub/models--org--name/{blobs,snapshots,refs,trees}

Each builder is deterministic (torch.manual_seed before each part; the tokenizers use mtn.tiny's tie-free BPE
learner: `tokenizers`' own trainers break ties through randomly seeded hash maps) and takes about a second on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

XLMR_LARGE_ID = "FacebookAI/xlm-roberta-large"
SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
XLMR_HIDDEN, CLIP_HIDDEN, CLIP_LEN = 1024, 768, 77  # the real widths: XLM-R large, SD 1.5's CLIP ViT-L/14 text
_COMMIT = re.compile(r"[0-9a-f]{40}")
_XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # XLM-R's ids 0..3 (fairseq order), <mask> after


def captions(n: int = 300, seed: int = 0) -> list[str]:
    """A multilingual training text for the tokenizers: mtn.tiny's en/de/fr captions + n generated English ones."""
    from mtn.tiny.captions import TINY_CORPUS, generate_captions

    return list(TINY_CORPUS) + generate_captions(n, seed=seed)


# ----------------------------------------------------------------------------------------------- XLM-R large
def xlmr_tokenizer(corpus: list[str] | None = None, n_merges: int = 400):
    """An XLM-R style SentencePiece-Unigram tokenizer (▁ word starts; <s> <pad> </s> <unk> <mask>; fast, so
    save_pretrained writes tokenizer.json) whose pieces and log-probabilities are learned from `corpus`."""
    from transformers import XLMRobertaTokenizerFast

    from mtn.tiny.tokenizers import _extra_chars, _learn_bpe

    corpus = corpus or captions()
    words = [["▁"] + list(w) for s in corpus for w in s.split()]
    merges = _learn_bpe(words, n_merges, lambda a, b: a + b)
    chars = sorted({c for w in words for c in w} | set(_extra_chars()))
    pieces = list(dict.fromkeys(["▁", *chars, *(a + b for a, b in merges)]))
    text = " ".join("▁" + w for s in corpus for w in s.split())
    freq = {p: text.count(p) + 1 for p in pieces}  # unigram log-probabilities from the pieces' frequencies
    total = sum(freq.values())
    vocab = [(t, 0.0) for t in _XLMR_SPECIALS] + [(p, math.log(freq[p] / total)) for p in pieces]
    return XLMRobertaTokenizerFast(vocab=vocab, model_max_length=512)


def xlmr_large_like(path: str | Path, seed: int = 0, num_layers: int = 1) -> Path:
    """Write an XLM-R large shaped repo folder (config.json, model.safetensors, tokenizer files): XLMRobertaModel
    with hidden 1024, 16 heads, 514 positions (512 usable), `num_layers` layers, a small FFN and vocabulary."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    path = Path(path)
    tok = xlmr_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=XLMR_HIDDEN, num_hidden_layers=num_layers,
                              num_attention_heads=16, intermediate_size=256, max_position_embeddings=514,
                              type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              architectures=["XLMRobertaModel"])
    torch.manual_seed(seed)
    XLMRobertaModel(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- SD 1.5
def clip_tokenizer(corpus: list[str] | None = None, n_merges: int = 400):
    """SD 1.5's tokenizer layout (CLIP BPE: bytes, bytes + </w>, merges, <|startoftext|> <|endoftext|>; lower case;
    77 positions, padded with <|endoftext|>), its merges learned from `corpus`."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import CLIPTokenizer

    from mtn.tiny.tokenizers import _learn_bpe

    corpus = corpus or captions()
    # the normalizer / pre-tokenizer transformers' CLIPTokenizer builds around vocab + merges
    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words = [list(w[:-1]) + [w[-1] + "</w>"] for s in corpus for w, _ in pre.pre_tokenize_str(norm.normalize_str(s))]
    merges = _learn_bpe(words, n_merges, lambda a, b: a + b)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), "<|startoftext|>",
              "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    # transformers 5: vocab=dict, merges=list[tuple] (vocab_file=/merges_file= would silently give 2 tokens)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN, pad_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def sd15_like(path: str | Path, seed: int = 0) -> Path:
    """Write a Stable Diffusion 1.5 shaped pipeline folder (model_index.json; text_encoder/ CLIPTextModel hidden 768,
    77 positions; tokenizer/; unet/ UNet2DConditionModel cross-attending at 768 with blocks (32, 64), sample_size 8;
    vae/ a 4-level AutoencoderKL (images 8x the latents, as SD's); scheduler/ SD's PNDM betas). No safety checker
    or feature extractor (requires_safety_checker false). Images: 64x64 by default, any multiple of 16."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    tok = clip_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_HIDDEN, intermediate_size=256, num_hidden_layers=1,
                            num_attention_heads=12, max_position_embeddings=CLIP_LEN, hidden_act="quick_gelu",
                            projection_dim=CLIP_HIDDEN, bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
                            eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN, attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,) * 4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- translator
def untrained_translator_folder(path: str | Path, source_id: str = XLMR_LARGE_ID, target_id: str = SD15_ID,
                                source_len: int = 32, seed: int = 0) -> Path:
    """An untrained MTN translator folder (no bundled encoder): source `source_id` (a 1024-d encoder, e.g. the hub
    id of xlmr_large_like, loaded by name when the translator loads) -> [*, 77, 768], SD 1.5's text space."""
    from mtn.model import ModelTranslationNetwork
    from mtn.translator import save_translator_folder

    torch.manual_seed(seed)
    mtn = ModelTranslationNetwork(source_dim=XLMR_HIDDEN, target_dim=CLIP_HIDDEN, source_len=source_len,
                                  target_len=CLIP_LEN, num_modules=1, hidden_dim=64, with_decoder=False)
    save_translator_folder(path, mtn, {
        "source_encoder": {"name_or_path": source_id, "max_length": source_len, "prefix": ""},
        "target_encoder": {"name_or_path": target_id, "subfolder": "text_encoder", "max_length": CLIP_LEN,
                           "prefix": ""}})
    return Path(path)


# ----------------------------------------------------------------------------------------------- HF cache
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(rel: str, size: int) -> bool:
    return size >= 10 * 1024 * 1024 or rel.endswith((".safetensors", ".bin", ".ckpt", ".model", ".pt"))


def populate_hf_cache(hf_home: str | Path, repo_id: str, folder: str | Path, revision: str = "main",
                      commit: str | None = None) -> Path:
    """Lay `folder` out in `<hf_home>/hub` as the hub cache holds a download of `repo_id` at `revision`; returns the
    snapshot folder. With HF_HOME=hf_home and HF_HUB_OFFLINE=1, snapshot_download(repo_id, revision=...) and
    transformers/diffusers from_pretrained(repo_id, revision=...) then resolve it.

    Layout (huggingface_hub's): blobs/<etag> (sha256 for LFS files, the git blob sha1 otherwise),
    snapshots/<commit>/<path> relative symlinks to ../../blobs/<etag>, refs/<revision> holding the commit (offline, a
    branch or tag resolves through that file; a 40-hex revision names the snapshot directly), trees/<commit>.json
    the file listing (what diffusers' offline loading and the snapshot completeness check read).
    `commit`: the snapshot's commit hash; default: `revision` when it is one, else a hash of the repo id and content.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no files")
    listing: dict[str, dict] = {}
    blobs: dict[str, bytes] = {}
    for p in files:
        rel, data = p.relative_to(folder).as_posix(), p.read_bytes()
        entry = {"size": len(data), "blob_id": _git_blob_sha1(data)}
        if _is_lfs(rel, len(data)):
            entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
        listing[rel] = entry
        blobs[rel] = data
    if commit is None:
        commit = revision if _COMMIT.fullmatch(revision) else hashlib.sha1(
            json.dumps([repo_id, listing], sort_keys=True).encode()).hexdigest()
    if not _COMMIT.fullmatch(commit):
        raise ValueError(f"commit must be 40 lower-case hex digits, got {commit!r}")
    org_name = repo_id.split("/")
    if len(org_name) != 2:
        raise ValueError(f"repo_id must be org/name, got {repo_id!r}")
    storage = Path(hf_home) / "hub" / f"models--{org_name[0]}--{org_name[1]}"
    snapshot = storage / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for rel, entry in listing.items():
        etag = entry.get("lfs_sha256") or entry["blob_id"]
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(blobs[rel])
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if revision != commit:
        ref = storage / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # no newline, as huggingface_hub writes it
    trees = storage / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    (trees / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}, indent=1))
    return snapshot
