"""Ratios (b) and (c) of bench/perf.py on a GPU, with the real encoders' architectures and tokenizers.

    python bench/perf_gpu.py --encoders DIR --pairs FILE.tsv

DIR holds `multilingual-e5-small/` and `all-MiniLM-L6-v2/` with config + tokenizer files; weights are not
needed (the models are built from their configs with random weights: the same compute, hence the same time).
FILE.tsv: `source<TAB>target` caption pairs. Prints:
(b) an epoch of MTN-3RM training from cached features (held in host memory as fp16, as a cache read gives them)
    vs encoding each batch with both encoders first; (c) MTN encoder latency vs the source encoder's forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mtn.encoders import FrozenTextEncoder
from mtn.losses import mse_loss
from mtn.model import ModelTranslationNetwork


def encoder(path: Path, max_length: int, prefix: str, device) -> FrozenTextEncoder:
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(path)).to(device).eval()
    return FrozenTextEncoder(model, AutoTokenizer.from_pretrained(path), str(path), max_length, prefix)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", type=Path, required=True)
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rows", type=int, default=2048)
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: only to check the script runs
    torch.backends.cuda.matmul.allow_tf32 = True
    pairs = [line.split("\t") for line in a.pairs.read_text().splitlines()][: a.rows]
    src = encoder(a.encoders / "multilingual-e5-small", 64, "query: ", dev)
    tgt = encoder(a.encoders / "all-MiniLM-L6-v2", 77, "", dev)
    mtn = ModelTranslationNetwork.from_named_size("mtn-3rm", source_dim=384, target_dim=384, source_len=64,
                                                  target_len=77, with_decoder=False).to(dev)
    opt = torch.optim.AdamW(mtn.parameters(), lr=1e-3)
    batches = [pairs[i:i + a.batch] for i in range(0, len(pairs) - a.batch + 1, a.batch)]

    def encode(batch):
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
            s, sm = src([x for x, _ in batch], zero_pad=True)  # [b, 64, 384], [b, 64]
            t, tm = tgt([y for _, y in batch], zero_pad=True)  # [b, 77, 384], [b, 77]
        return s.float(), sm, t.float(), tm

    def step(s, sm, t, tm):
        with torch.autocast(dev.type, torch.bfloat16):
            loss = mse_loss(mtn.encode(s, sm), t, tm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cache = [tuple(x.cpu().half() if x.is_floating_point() else x.cpu() for x in encode(b)) for b in batches]
    for b in cache[:5]:  # warm-up: kernels, allocator
        step(*(x.to(dev).float() if x.is_floating_point() else x.to(dev) for x in b))
    sync()
    t0 = time.perf_counter()
    for b in cache:
        step(*(x.to(dev, non_blocking=True).float() if x.is_floating_point() else x.to(dev) for x in b))
    sync()
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches:
        step(*encode(b))
    sync()
    fly = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"(b) {gpu}: one epoch of {len(batches) * a.batch} pairs, MTN-3RM, batch {a.batch}, bf16 autocast:")
    print(f"    from cached features: {cached:.2f} s   encoding on the fly: {fly:.2f} s   "
          f"ratio = {fly / cached:.2f}x (goal >= 5x)")

    for bs in (1, a.batch):
        prompts = [x for x, _ in pairs[:bs]]
        st, mt = [], []
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16):
            for i in range(25):
                sync()
                t0 = time.perf_counter()
                h, m = src(prompts, zero_pad=True)
                sync()
                t1 = time.perf_counter()
                mtn.encode(h, m)
                sync()
                if i >= 5:
                    st.append(t1 - t0)
                    mt.append(time.perf_counter() - t1)
        s_ms, m_ms = statistics.median(st) * 1e3, statistics.median(mt) * 1e3
        print(f"(c) {gpu}, batch {bs}: source encoder {s_ms:.2f} ms, MTN-3RM encoder {m_ms:.2f} ms, "
              f"ratio MTN / source = {m_ms / s_ms:.2f}x (median of 20)")


if __name__ == "__main__":
    main()
