"""The DeepSpeed engine both Ray Train jobs train with: one config builder, torch AdamW over the caller's param
groups, the LR schedule of mtn/train/schedule.py.

cfg fields read: zero_stage, offload_optimizer, grad_clip, precision (resolved: fp32 | amp-bf16 | bf16 | fp16),
lr, weight_decay, and the schedule's lr_schedule, warmup_steps, max_steps, lr_min_ratio.
"""

from __future__ import annotations

from mtn.train.precision import deepspeed_precision
from mtn.train.schedule import lr_scheduler


def deepspeed_config(cfg, micro_batch: int, grad_accum: int = 1) -> dict:
    """The DeepSpeed config for `micro_batch` rows per rank per micro-step (global batch = micro_batch x world x
    grad_accum). The optimizer and scheduler are passed to deepspeed.initialize as objects, not named here."""
    zero = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # our torch AdamW under ZeRO (DeepSpeed calls it untested) and under offload (no cpu_adam build: BENCHMARKS.md)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        **deepspeed_precision(cfg.precision),
        "steps_per_print": 10**9,
    }


def initialize_engine(module, param_groups: list[dict], cfg, micro_batch: int, grad_accum: int = 1):
    """-> the DeepSpeed engine training `module`: torch AdamW over `param_groups` ({"params": [...]} each, with its
    own "lr" or cfg.lr; weight_decay=cfg.weight_decay), stepped by lr_scheduler(optimizer, cfg)."""
    import deepspeed
    import torch

    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, cfg),
                                      config=deepspeed_config(cfg, micro_batch, grad_accum))
    return engine
