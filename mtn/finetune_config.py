"""FinetuneConfig: the UNet finetune job's config (jobs/finetune_unet.py, jobs/precompute_latents.py); the shared
Ray Train fields and checks come from mtn.train.config.JobConfig, the loader is mtn.config.load_config."""

from __future__ import annotations

from typing import ClassVar

from mtn.config import Prompts
from mtn.train.config import JobConfig


class FinetuneConfig(JobConfig):
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir", "storage_path", "train_shards", "precomputed")
    ALLOWED_PRECISIONS: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")  # bf16: GPU

    # --- run
    name: str = "unet-local"
    output_dir: str = "outputs/finetune-local"  # final pipeline/ and translator/ go here
    # --- models
    pipeline: str = "tiny"  # diffusers SD/LDM pipeline: folder or hub id (UNet + VAE + noise scheduler); "tiny"
    translator: str | None = "tiny"  # translator folder/URI (source LM + MTN); "tiny": seeded untrained; null: native
    train_mtn: bool = False  # train the MTN jointly at mtn_lr (the paper: 1e-6); else it stays frozen
    mtn_lr: float = 1.0e-6
    # --- data: img2dataset webdataset shards (s3://, folder, glob, {00000..00099} range or a shard-list file)
    train_shards: str = "{output_dir}/shards"
    generate_shards: int = 0  # > 0: write this many toy shards into train_shards when it holds none (local default)
    resolution: int = 256
    center_crop: bool = True
    random_flip: bool = False
    shuffle_buffer: int = 1000
    loader_workers: int = 2  # DataLoader processes per Ray worker (decoding + resizing)
    min_caption_chars: int = 1
    min_image_size: int = 0  # drop images whose shorter side is smaller (before resizing)
    # unreadable or cut-short shards a reader may skip (S3 outage, broken upload) before the run fails instead of
    # training on less data; a fraction of each reader's shards in [0, 1] (1.0: only count them)
    max_skipped_shard_fraction: float = 0.05
    # jobs/precompute_latents.py output (VAE latents + text features): when set, training reads it instead of images
    precomputed: str | None = None
    precompute_workers: int = 1  # encoder actors of the precompute job
    precompute_gpus_per_worker: float = 0.0
    # --- optimisation (batch_size is GLOBAL: divided by num_workers, times grad_accum micro-steps)
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    zero_stage: int = 2
    gradient_checkpointing: bool = False
    # --- diffusion objective
    snr_gamma: float | None = None  # min-SNR-gamma weighting (5.0 in the paper); null: plain MSE
    noise_offset: float = 0.0
    caption_dropout: float = 0.1  # captions replaced by "" (classifier-free guidance)
    ema_decay: float = 0.0  # > 0: keep an EMA of the UNet weights (0.9999 at scale); saved as the final UNet
    # --- validation (a grid of val_prompts logged every val_every steps)
    val_prompts: Prompts = ["a red dog runs on the beach", "ein roter Hund läuft am Strand",
                            "un chat noir dort sur le canapé"]
    val_steps: int = 20
    val_guidance_scale: float = 7.5
    val_seed: int = 0
    # register_model (JobConfig): the registered model the final pipeline (+ its translator) becomes a version of
    # --- tracking
    mlflow_experiment: str = "mtn-finetune"

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.batch_size % (self.num_workers * self.grad_accum) == 0,
             f"batch_size ({self.batch_size}) is global: it must divide by num_workers x grad_accum "
             f"({self.num_workers} x {self.grad_accum})"),
            (self.mtn_lr >= 0, "mtn_lr must be >= 0"),
            (0.0 <= self.caption_dropout < 1.0, "caption_dropout must be in [0, 1)"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1) (0 disables EMA)"),
            (not (self.ema_decay and self.zero_stage == 3),
             "ema_decay needs whole UNet weights on each rank: use zero_stage <= 2 with EMA"),
            (self.resolution % 8 == 0 and self.resolution >= 8, "resolution must be a multiple of 8"),
            (not self.train_mtn or self.translator is not None, "train_mtn needs a translator"),
            (self.loader_workers >= 0, "loader_workers must be >= 0"),
        ]

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)
