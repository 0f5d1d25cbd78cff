"""diffusers glue: generate with a translator through `prompt_embeds` / `negative_prompt_embeds` only.

    >>> pipe = load_pipeline("runwayml/stable-diffusion-v1-5", device="cuda", dtype=torch.float16, scheduler="dpm")
    >>> tr = load_translator("outputs/multi30k-de/translator", device="cuda", dtype=torch.float16)
    >>> images = generate(pipe, tr, ["ein roter Hund läuft am Strand"], seeds=[0], guidance_scale=7.5)

The empty / negative prompt: for a translator route, the unconditional embedding is the TRANSLATOR's
encoding of the negative prompt ("" when none is given), not the pipeline's own CLIP("") embedding. Both
halves of classifier-free guidance then live in the same translated space, so their difference carries the
prompt and not the gap between two encoders; the MTN sees "" during training as any other caption, so
its translation lands near CLIP(""). `route=None` (native) uses the pipeline's own encode_prompt for both.

Any pipeline whose __call__ takes `prompt_embeds` works (Stable Diffusion 1.x/2.x and relatives); the
LDM text2im pipeline does not take embeddings, so it is refused with that reason rather than patched.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from mtn.errors import MTNError

SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "plms": "PNDMScheduler",
              "dpm": "DPMSolverMultistepScheduler"}


def load_pipeline(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  scheduler: str = "default"):
    """A diffusers text-to-image pipeline (folder or hub id) with no safety checker download; checked to take
    prompt_embeds. `scheduler`: default | ddim | pndm (PLMS) | dpm (DPM-Solver++ multistep)."""
    from diffusers import DiffusionPipeline

    local = Path(name_or_path)
    if (name_or_path.startswith((".", "/")) or local.exists()) and not (local / "model_index.json").is_file():
        raise MTNError(f"{name_or_path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(name_or_path, dtype=dtype, safety_checker=None,
                                                 requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise MTNError(f"cannot load diffusers pipeline {name_or_path!r}: {e}") from e
    check_takes_embeddings(pipe)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_takes_embeddings(pipe) -> None:
    params = inspect.signature(pipe.__call__).parameters
    if "prompt_embeds" not in params or "negative_prompt_embeds" not in params:
        raise MTNError(f"{type(pipe).__name__} does not accept prompt_embeds/negative_prompt_embeds, so a translator "
                       "cannot condition it without patching; use a Stable Diffusion-style pipeline")


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler keeping the trained noise schedule (betas, prediction type) from the pipeline's config."""
    if name in (None, "", "default"):
        return
    if name not in SCHEDULERS:
        raise MTNError(f"unknown scheduler {name!r}; use default, {', '.join(SCHEDULERS)}")
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    kwargs = {"skip_prk_steps": True} if name in ("pndm", "plms") else {}  # PLMS as in the SD/LDM papers
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)


def text_embeddings(pipe, translator, prompts: list[str], negative_prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds), each [B, S_t, d_t], both from the same route.
    translator=None: the pipeline's own text encoder (its encode_prompt)."""
    if len(prompts) != len(negative_prompts):
        raise MTNError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    unet = pipe.unet
    if translator is None:
        pos, neg = pipe.encode_prompt(list(prompts), unet.device, 1, True, negative_prompt=list(negative_prompts))
        return pos, neg  # [B, 77, d_t] each
    s_t, d_t = translator.target_shape
    if d_t != unet.config.cross_attention_dim:
        raise MTNError(f"the translator outputs d_t={d_t} but the UNet cross-attends to "
                       f"{unet.config.cross_attention_dim}: it was trained for another target encoder")
    both = translator.encode(list(prompts) + list(negative_prompts))  # [2B, S_t, d_t]
    both = both.to(unet.device, unet.dtype)
    return both[: len(prompts)], both[len(prompts):]


def generators(seeds: list[int], device) -> list[torch.Generator]:
    """One generator per image: an image depends only on its own seed, so batching never changes it."""
    dev = torch.device(device)
    return [torch.Generator(device=dev.type if dev.type != "mps" else "cpu").manual_seed(int(s)) for s in seeds]


def run_pipeline(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, seeds: list[int],
                 num_inference_steps: int = 30, guidance_scale: float = 7.5, width: int = 512, height: int = 512):
    """The denoising loop + VAE decode for precomputed embeddings ([N, S, d] each, one row per image) -> PIL images."""
    if len(seeds) != prompt_embeds.shape[0]:
        raise MTNError(f"{prompt_embeds.shape[0]} embeddings but {len(seeds)} seeds")
    out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, width=width, height=height,
               generator=generators(seeds, pipe.unet.device), output_type="pil")
    return out.images


def generate(pipe, translator, prompts: list[str], negative_prompts: list[str] | None = None,
             seeds: list[int] | None = None, num_images: int = 1, **kwargs):
    """prompts -> num_images PIL images each (prompt-major order). Seeds: one per prompt (image k of a
    prompt with seed s uses s + k); default 0, 1, 2, ..."""
    negative_prompts = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    pos, neg = text_embeddings(pipe, translator, prompts, negative_prompts)  # [B, S, d] each
    pos, neg = pos.repeat_interleave(num_images, 0), neg.repeat_interleave(num_images, 0)  # [B*n, S, d]
    image_seeds = [s + k for s in seeds for k in range(num_images)]
    return run_pipeline(pipe, pos, neg, image_seeds, **kwargs)


# ------------------------------------------------------------------------------- tiny pipeline (tests, demo)


def build_tiny_sd_pipeline(seed: int = 0, sample_size: int = 32):
    """A Stable Diffusion pipeline small enough for CPU tests, built from configs (no files, no hub).

    Its text encoder IS `tiny:clip` (same tokenizer, same seed), so a translator trained with
    target_encoder=tiny:clip (jobs/configs/local.yaml) speaks this UNet's language."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from mtn.tiny import TINY_HIDDEN_SIZES, build_tiny_encoder

    text_encoder, tokenizer = build_tiny_encoder("clip", seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size // 4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN_SIZES["clip"], attention_head_dim=4, norm_num_groups=8)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_translator(target_dim: int = 48, target_len: int = 77, source_len: int = 16, seed: int = 0):
    """An untrained translator (tiny:t5 bytes -> MTN -> [*, target_len, target_dim]), seeded: a stand-in where a
    trained one is not needed (tests, the finetune job's tiny default)."""
    from mtn.encoders import load_text_encoder
    from mtn.model import ModelTranslationNetwork
    from mtn.translator import Translator

    source = load_text_encoder("tiny:t5", max_length=source_len)
    torch.manual_seed(seed)
    mtn = ModelTranslationNetwork(source_dim=source.hidden_size, target_dim=target_dim, source_len=source_len,
                                  target_len=target_len, num_modules=1, hidden_dim=32)
    target_spec = {"name_or_path": "tiny:clip", "max_length": target_len, "prefix": ""}
    return Translator(source, mtn, {"target_encoder": target_spec})
