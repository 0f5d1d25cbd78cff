"""FinetuneConfig: the UNet finetune job's flat config (same YAML + key=value rules as TrainConfig)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mtn.errors import MTNError


@dataclass
class FinetuneConfig:
    # --- run
    name: str = "unet-local"
    output_dir: str = "outputs/finetune-local"  # final pipeline/ and translator/ go here
    seed: int = 0
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
    lr: float = 1.0e-4
    lr_schedule: str = "constant"  # constant | cosine (after linear warmup)
    warmup_steps: int = 0
    max_steps: int = 100
    weight_decay: float = 1.0e-2
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (GPU) | fp16
    zero_stage: int = 2
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    # --- diffusion objective
    snr_gamma: float | None = None  # min-SNR-gamma weighting (5.0 in the paper); null: plain MSE
    noise_offset: float = 0.0
    caption_dropout: float = 0.1  # captions replaced by "" (classifier-free guidance)
    ema_decay: float = 0.0  # > 0: keep an EMA of the UNet weights (0.9999 at scale); saved as the final UNet
    # --- validation, logging, checkpoints
    val_every: int = 50
    val_prompts: str = "a red dog runs on the beach|ein roter Hund läuft am Strand|un chat noir dort sur le canapé"
    val_steps: int = 20
    val_guidance_scale: float = 7.5
    val_seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    num_checkpoints_to_keep: int = 2
    # a re-run with the same name + storage_path: auto (resume if the config matches the checkpoint's, else refuse
    # naming the changed keys) | never (delete the run's checkpoints, start at step 0) | force (resume anyway);
    # the keys that may change without refusing: mtn/train/resume.py RESUMABLE
    resume: str = "auto"
    checkpoint_staging_dir: str | None = None  # where ranks write a checkpoint before Ray stores it (free space is
    #                                            checked first): an absolute path on the worker nodes;
    #                                            None: the system temp dir ($TMPDIR or /tmp)
    register_model: str | None = None  # MLflow registered model name for the final pipeline; null: not registered
    # --- cluster
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    storage_path: str = "{output_dir}/ray_results"
    ray_address: str | None = None
    stop_timeout_s: float = 300.0  # after SIGTERM: time to checkpoint at a step boundary before exiting
    #                               without one (mtn/train/preemption.py); a second SIGTERM exits at once
    # --- tracking
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///{output_dir}/mlflow.db
    mlflow_experiment: str = "mtn-finetune"

    def __post_init__(self):
        checks = [
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}"),
            (self.precision in ("fp32", "bf16", "fp16"), f"precision must be fp32|bf16|fp16, got {self.precision!r}"),
            (self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant|cosine, got {self.lr_schedule!r}"),
            (self.num_workers >= 1 and self.grad_accum >= 1, "num_workers and grad_accum must be >= 1"),
            (self.batch_size % (self.num_workers * self.grad_accum) == 0,
             f"batch_size ({self.batch_size}) is global: it must divide by num_workers x grad_accum "
             f"({self.num_workers} x {self.grad_accum})"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (min(self.val_every, self.checkpoint_every, self.log_every) >= 1,
             "val_every, checkpoint_every and log_every must be >= 1"),
            (self.lr > 0 and self.mtn_lr >= 0, "lr must be > 0 and mtn_lr >= 0"),
            (0.0 <= self.caption_dropout < 1.0, "caption_dropout must be in [0, 1)"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1) (0 disables EMA)"),
            (not (self.ema_decay and self.zero_stage == 3),
             "ema_decay needs whole UNet weights on each rank: use zero_stage <= 2 with EMA"),
            (self.resolution % 8 == 0 and self.resolution >= 8, "resolution must be a multiple of 8"),
            (not self.train_mtn or self.translator is not None, "train_mtn needs a translator"),
            (self.resume in ("auto", "never", "force"), f"resume must be auto|never|force, got {self.resume!r}"),
            (self.loader_workers >= 0, "loader_workers must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MTNError(f"config: {msg}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.num_workers * self.grad_accum)

    @property
    def prompts(self) -> list[str]:
        return [p.strip() for p in self.val_prompts.split("|") if p.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
