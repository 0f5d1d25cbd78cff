"""diffusers glue: generate with a translator through `prompt_embeds` / `negative_prompt_embeds` only.

    >>> pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", "cuda", torch.float16, scheduler="dpm")
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

TINY_PREFIX = "tiny:"  # tiny:sd: the seeded CPU-sized pipeline from mtn.tiny.sd
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "plms": "PNDMScheduler",
              "dpm": "DPMSolverMultistepScheduler"}


def load_pipeline(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  scheduler: str = "default"):
    """A diffusers text-to-image pipeline with no safety checker download, checked to take prompt_embeds, from a
    save_pretrained folder, a hub id `org/name[@revision]` (a branch, tag or commit; e.g.
    stable-diffusion-v1-5/stable-diffusion-v1-5; read from the HF cache alone under HF_HUB_OFFLINE=1; a local
    folder of the same spelling wins) or tiny:sd. `scheduler`: default | ddim | pndm (PLMS) | dpm (DPM-Solver++)."""
    from diffusers import DiffusionPipeline

    from mtn.uris import hub_snapshot, parse_hub_id

    name_or_path = str(name_or_path)
    local = Path(name_or_path).expanduser()
    hub = None if name_or_path.startswith(TINY_PREFIX) else parse_hub_id(name_or_path)  # None for a local folder
    if name_or_path.startswith(TINY_PREFIX):
        from mtn.tiny.sd import tiny_pipeline  # offline stand-in, imported only when asked for

        pipe = tiny_pipeline(name_or_path)
        pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)  # built in float32
    else:
        if hub is not None:  # the one hub resolver (mtn.uris): the HF cache's snapshot, or one line why not
            local = hub_snapshot(*hub, marker="model_index.json")
        elif not local.is_dir():
            raise MTNError(f"pipeline folder not found: {name_or_path} (expected a folder, a hub id "
                           "org/name[@revision] or tiny:sd)")
        if not (local / "model_index.json").is_file():
            raise MTNError(f"{name_or_path} is not a diffusers pipeline folder (no model_index.json)")
        try:
            pipe = DiffusionPipeline.from_pretrained(str(local), dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, a broken folder: one line for the user
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f" (at {local})" if hub is not None else ""
            raise MTNError(f"cannot load diffusers pipeline {name_or_path!r}{where}: {msg}") from None
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


def check_translator(pipe, translator) -> dict:
    """Refuse a translator whose declared target space the pipeline cannot consume, in ONE line naming both sides:
    its width d_t against the UNet's cross_attention_dim, its length S_t against the pipeline tokenizer's
    model_max_length (when the pipeline has a tokenizer). -> the translator's target space. For text_embeddings,
    and for a service at load time."""
    space = getattr(translator, "target_space", None)
    if not isinstance(space, dict):  # a translator-like object without a declared space: its output shape
        length, width = translator.target_shape
        space = {"encoder": None, "width": width, "length": length}
    cross = pipe.unet.config.cross_attention_dim
    tokenizer = getattr(pipe, "tokenizer", None)
    max_length = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    encoder = "/".join(str(p) for p in (space.get("encoder"), space.get("subfolder")) if p)
    what = f"the translator writes [*, {space['length']}, {space['width']}] for {encoder or 'an unnamed encoder'}"
    if space["width"] != cross:
        raise MTNError(f"{what} (width {space['width']}) but the UNet cross-attends to {cross}-d text: it was "
                       f"trained for another text encoder")
    # a tokenizer saved without a limit reports transformers' VERY_LARGE_INTEGER (1e30): no length to check then
    if isinstance(max_length, int) and max_length < 1_000_000 and max_length != space["length"]:
        raise MTNError(f"{what} (length {space['length']}) but the pipeline's tokenizer pads prompts to "
                       f"{max_length} tokens: it was trained for another text encoder")
    return space


def text_embeddings(pipe, translator, prompts: list[str], negative_prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds), each [B, S_t, d_t], both from the same route.
    translator=None: the pipeline's own text encoder (its encode_prompt); a translator is checked against the
    pipeline first (check_translator)."""
    if len(prompts) != len(negative_prompts):
        raise MTNError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    unet = pipe.unet
    if translator is None:
        pos, neg = pipe.encode_prompt(list(prompts), unet.device, 1, True, negative_prompt=list(negative_prompts))
        return pos, neg  # [B, 77, d_t] each
    check_translator(pipe, translator)
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
