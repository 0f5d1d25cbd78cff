"""A Stable Diffusion pipeline small enough for CPU tests (``tiny:sd``), built from configs: no files, no hub."""

from __future__ import annotations

import torch

from mtn.errors import MTNError
from mtn.tiny import TINY_HIDDEN_SIZES
from mtn.tiny.encoders import build_tiny_encoder


def tiny_pipeline(ref: str):
    """The pipeline for a ``tiny:`` reference (what mtn.pipeline.load_pipeline dispatches here): only tiny:sd."""
    if ref != "tiny:sd":
        raise MTNError(f"unknown builtin pipeline {ref!r}; the tiny one is 'tiny:sd'")
    return build_tiny_sd_pipeline()


def build_tiny_sd_pipeline(seed: int = 0, sample_size: int = 32):
    """A Stable Diffusion pipeline small enough for CPU tests, built from configs (no files, no hub).

    Its text encoder IS `tiny:clip` (same tokenizer, same seed), so a translator trained with
    target_encoder=tiny:clip (jobs/configs/local.yaml) speaks this UNet's language."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

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
