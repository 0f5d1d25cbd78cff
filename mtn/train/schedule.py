"""The one learning-rate schedule of both Ray Train jobs: linear warmup from 0, then constant or a cosine decay to
lr * lr_min_ratio at max_steps (transformers' `get_scheduler`; each param group keeps its own peak lr).

A LambdaLR stepped once per optimizer step (DeepSpeed steps a scheduler handed to `deepspeed.initialize` after every
`engine.step()`). Its checkpointed state is the step count and the groups' base lrs only, so a resumed run with a
larger max_steps re-stretches the cosine to the new end (mtn/train/resume.py lists max_steps as resumable).
"""

from __future__ import annotations

SCHEDULES = ("constant", "cosine")
DEFAULT_MIN_RATIO = 0.01  # TrainConfig's lr_min_ratio default; what a config without the field gets


def lr_scheduler(optimizer, cfg):
    """-> a torch LR scheduler over `optimizer` for cfg.lr_schedule (constant | cosine), cfg.warmup_steps,
    cfg.max_steps and cfg.lr_min_ratio (cosine only)."""
    from transformers import get_scheduler

    if cfg.lr_schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.max_steps,
                             scheduler_specific_kwargs={"min_lr_rate": getattr(cfg, "lr_min_ratio",
                                                                               DEFAULT_MIN_RATIO)})
    raise ValueError(f"lr_schedule must be {'|'.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
