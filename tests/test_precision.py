import pytest
import torch

from mtn.train.precision import autocast, bf16_is_fast, describe, input_dtype, resolve_precision


def test_auto_follows_the_measured_hardware_and_explicit_choices_stay():
    assert resolve_precision("auto") == ("amp-bf16" if bf16_is_fast("cpu") else "fp32")
    for p in ("fp32", "amp-bf16", "bf16", "fp16"):
        assert resolve_precision(p) == p
    assert resolve_precision("auto", "meta") == "fp32"  # no native bf16 assumed for devices it cannot probe
    assert describe("cpu").startswith("cpu, ") and describe("cpu").endswith("bf16")


def test_autocast_computes_linear_layers_in_bf16_and_fp32_stays_fp32():
    lin, x = torch.nn.Linear(8, 4), torch.randn(2, 8)
    with autocast("amp-bf16"):
        assert lin(x).dtype == torch.bfloat16
    with autocast("fp32"):
        assert lin(x).dtype == torch.float32
    assert input_dtype("amp-bf16") == torch.float32 and input_dtype("bf16") == torch.bfloat16


@pytest.mark.parametrize("precision,autocast_on,bf16_weights", [("amp-bf16", True, False), ("bf16", False, True),
                                                                ("fp32", False, False)])
def test_deepspeed_config_per_precision(precision, autocast_on, bf16_weights):
    from mtn.config import REPO_ROOT, load_config
    from mtn.train.deepspeed import deepspeed_config

    cfg = load_config(REPO_ROOT / "jobs/configs/local.yaml", [f"precision={precision}"])
    ds = deepspeed_config(cfg, micro_batch=cfg.batch_size)
    assert ds["torch_autocast"]["enabled"] is autocast_on and ds["bf16"]["enabled"] is bf16_weights
    # gradients stay fp32 in the all-reduce under autocast (see mtn/train/precision.py)
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []


def test_auto_follows_the_cpu_flags_not_a_timing():
    # the kernel's view of the CPU agrees with torch's probes: bf16 is "native" exactly with AVX512-BF16 or AMX-BF16
    import pathlib

    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("needs /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert bf16_is_fast("cpu") == bool(flags & {"avx512_bf16", "amx_bf16"})
