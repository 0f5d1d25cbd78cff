"""Training precision. `auto` picks bf16 autocast where the hardware runs bf16 matmuls natively and fp32 elsewhere.

The CPU behind a "2-core box" varies: with AVX512-BF16/AMX a bf16 matmul is faster than fp32, on an AVX2-only CPU
it is emulated and much slower (figures: BENCHMARKS.md, ../shared/STACK.md). `torch.backends.cpu.get_cpu_capability()` says
"AVX512" on both kinds of AVX512 CPU, so on the CPU the choice reads the instruction set (AVX512-BF16 or AMX);
on CUDA it is `torch.cuda.is_bf16_supported()`.

Precisions: fp32; amp-bf16 (fp32 weights and optimizer, bf16 compute under torch.autocast; evaluation in fp32);
bf16 / fp16 (DeepSpeed's low-precision weights with fp32 master copies).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from mtn.config import PRECISIONS  # noqa: F401 (the option values live with the config)


@functools.cache
def bf16_is_fast(device_type: str = "cpu") -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    # the CPU's instruction set, not a timing: a timed matmul flipped the answer on a loaded CI box (every worker of a
    # run must choose alike, and a test must be able to predict the choice). torch's own probes (private; absent -> no)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def resolve_precision(precision: str, device_type: str = "cpu") -> str:
    """'auto' -> 'amp-bf16' where bf16 runs natively on this device, else 'fp32'; others unchanged."""
    if precision != "auto":
        return precision
    return "amp-bf16" if bf16_is_fast(device_type) else "fp32"


def autocast(precision: str, device_type: str = "cpu"):
    """The forward's context: bf16 autocast for amp-bf16, nothing otherwise."""
    if precision == "amp-bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_dtype(precision: str) -> torch.dtype:
    """The dtype of the weights DeepSpeed trains (it casts them for bf16/fp16), and so of the inputs fed to them;
    fp32 otherwise (amp-bf16 included: autocast casts inside the forward)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def deepspeed_precision(precision: str) -> dict:
    """The DeepSpeed config blocks for a resolved precision. DeepSpeed's low-precision weights only for bf16/fp16;
    amp-bf16 keeps fp32 weights and optimizer and runs the forward under torch.autocast, entered by the engine itself
    (an autocast around engine() is switched off)."""
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # gradients stay fp32 in the all-reduce too (no module is marked lower-precision-safe): DeepSpeed's bf16 comm
        # buckets mixed with fp32 ones crashed a resumed ZeRO-2 run over gloo (tests/test_train_job.py)
        "torch_autocast": {"enabled": precision == "amp-bf16", "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
    }


def describe(device_type: str = "cpu") -> str:
    """'cpu, AVX512, native bf16' / 'cuda': what a log line or a benchmark row should say about the hardware."""
    if device_type != "cpu":
        return device_type
    return f"cpu, {torch.backends.cpu.get_cpu_capability()}, {'native' if bf16_is_fast('cpu') else 'no fast'} bf16"
