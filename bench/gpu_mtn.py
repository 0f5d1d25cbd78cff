"""MTN on one GPU at the paper's dims: training step throughput (bf16 autocast), encode latency, CPU/GPU agreement.

    python bench/gpu_mtn.py            # prints one table; a benchmark, not a test (needs CUDA)

Dims: T5-3B d=1024 -> LDM-BERT d=1280, 77 -> 77 tokens (GlueGen's setup), losses mse + 0.1 rec + 0.1 cycle.
"""

import functools
import time

import torch

from mtn.losses import DEFAULT_WEIGHTS, mtn_losses
from mtn.model import ModelTranslationNetwork


def timed(fn, n):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def train_step(mtn, opt, src, mask, tgt, weights):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, _ = mtn_losses(mtn, None, src, mask, tgt, mask, weights)  # [B, 77, 1024] -> [B, 77, 1280]
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()


def main():
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    # agreement: the same seeded small MTN on CPU and GPU, fp32
    torch.manual_seed(0)
    small = ModelTranslationNetwork(source_dim=64, target_dim=48, source_len=32, target_len=77, num_modules=3)
    x, m = torch.randn(4, 32, 64), torch.ones(4, 32)
    m[:, 20:] = 0
    ref = small.encode(x, m)
    got = small.to(dev).encode(x.to(dev), m.to(dev)).cpu()
    print(f"cpu vs cuda fp32 max |diff|: {(ref - got).abs().max().item():.2e}")

    weights = {**DEFAULT_WEIGHTS}
    for size in ("mtn-3rm", "mtn-5rm"):
        torch.manual_seed(0)
        mtn = ModelTranslationNetwork.from_named_size(size, source_dim=1024, target_dim=1280, source_len=77,
                                                      target_len=77).to(dev)
        opt = torch.optim.AdamW(mtn.parameters(), lr=1e-4, fused=True)
        for bs in (128, 512):
            src = torch.randn(bs, 77, 1024, device=dev)
            mask = torch.ones(bs, 77, device=dev)
            tgt = torch.randn(bs, 77, 1280, device=dev)

            torch.cuda.reset_peak_memory_stats()
            dt = timed(functools.partial(train_step, mtn, opt, src, mask, tgt, weights), 20)
            print(f"{size} train step bs={bs}: {dt * 1e3:.1f} ms, {bs / dt:,.0f} samples/s, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        mtn.eval()
        for bs in (1, 8):
            src = torch.randn(bs, 77, 1024, device=dev, dtype=torch.bfloat16)
            mtn_bf16 = mtn.to(torch.bfloat16)
            with torch.no_grad():
                dt = timed(functools.partial(mtn_bf16.encode, src), 50)
            print(f"{size} encode bs={bs} bf16: {dt * 1e3:.2f} ms")
        mtn.float()


if __name__ == "__main__":
    main()
