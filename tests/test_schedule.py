"""The one LR schedule of both jobs (mtn/train/schedule.py) and the DeepSpeed config builder (mtn/train/deepspeed.py)."""

import types

import pytest
import torch

from mtn.train.deepspeed import deepspeed_config
from mtn.train.schedule import lr_scheduler


def lrs(schedule: str, steps: int, warmup=10, max_steps=110, min_ratio=0.1, group_lrs=(1e-3,)) -> list[list[float]]:
    """The lr of each param group before each of `steps` optimizer steps."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs]
    opt = torch.optim.AdamW(groups)
    cfg = types.SimpleNamespace(lr_schedule=schedule, warmup_steps=warmup, max_steps=max_steps, lr_min_ratio=min_ratio)
    sched, seen = lr_scheduler(opt, cfg), []
    for _ in range(steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


def test_warmup_then_constant():
    seen = [g[0] for g in lrs("constant", 60)]
    assert seen[0] == 0.0 and seen[1] == pytest.approx(1e-4) and seen[5] == pytest.approx(5e-4)  # linear from 0
    assert seen[10] == seen[59] == pytest.approx(1e-3)


def test_warmup_then_cosine_to_min_ratio_per_group():
    seen = lrs("cosine", 111, group_lrs=(1e-3, 1e-6))
    assert seen[5] == pytest.approx([5e-4, 5e-7]) and seen[10] == pytest.approx([1e-3, 1e-6])
    assert seen[60] == pytest.approx([0.55e-3, 0.55e-6])  # half way: (1 + 0.1) / 2 of the peak
    assert seen[110] == pytest.approx([1e-4, 1e-7])  # max_steps: lr * lr_min_ratio, each group its own


def test_no_warmup_starts_at_the_peak_and_unknown_schedule_is_refused():
    assert lrs("cosine", 1, warmup=0)[0] == [1e-3]
    with pytest.raises(ValueError, match="lr_schedule must be constant|cosine"):
        lrs("linear", 1)


@pytest.mark.parametrize("precision,autocast_on,bf16,fp16", [("amp-bf16", True, False, False),
                                                             ("bf16", False, True, False),
                                                             ("fp16", False, False, True),
                                                             ("fp32", False, False, False)])
def test_deepspeed_config_per_precision(precision, autocast_on, bf16, fp16):
    cfg = types.SimpleNamespace(zero_stage=3, offload_optimizer=True, grad_clip=0.5, precision=precision)
    ds = deepspeed_config(cfg, micro_batch=16, grad_accum=2)
    assert ds["torch_autocast"]["enabled"] is autocast_on
    assert ds["bf16"]["enabled"] is bf16 and ds["fp16"]["enabled"] is fp16
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds and "scheduler" not in ds  # objects passed to deepspeed.initialize
