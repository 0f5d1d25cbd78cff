"""UNet training throughput on one GPU: an SD-1.x-sized UNet (random weights, 860M params) at 256 px, bf16.

    python bench/gpu_unet.py                  # needs CUDA; prints images/s per GPU for a few batch sizes
    python bench/gpu_unet.py --tiny --steps 3 # the same code path on CPU with a tiny UNet (a smoke run)

Measures the UNet's forward + backward + AdamW step on precomputed-latent-shaped inputs ([B, 4, 32, 32] latents,
[B, 77, 768] text embeddings) with the DDPM epsilon loss: the number comparable to MosaicML's ~137 images/s per
A100 at 256 px with precomputed latents. The VAE encoder, the text encoder and data loading are not included.
A benchmark, never a test.
"""

import argparse
import time

import torch

from mtn.diffusion import diffusion_loss, sample_noise

SD_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 cross_attention_dim=48, attention_head_dim=4, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def main() -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, ~+30%% time)")
    a = p.parse_args()
    dev = torch.device("cpu" if a.tiny else "cuda")
    cfg = TINY_UNET if a.tiny else SD_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(dev)
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=dev.type == "cuda")
    print(f"device {torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}, UNet "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params, latents {cfg['sample_size']}^2, bf16 autocast")
    side, d = cfg["sample_size"], cfg["cross_attention_dim"]
    for b in a.batch:
        g = torch.Generator(dev).manual_seed(0)
        latents = torch.randn(b, 4, side, side, device=dev, generator=g)  # [B, 4, 32, 32] = 256 px after the VAE
        text = torch.randn(b, 77, d, device=dev, generator=g)  # [B, 77, 768]

        def step(latents=latents, text=text, g=g, b=b):
            noise = sample_noise(latents, g)
            t = torch.randint(0, 1000, (b,), device=dev, generator=g)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
            loss = diffusion_loss(out, latents, noise, t, sched)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            for _ in range(3):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / a.steps
            mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else ""
            print(f"batch {b:4d}: {dt * 1000:8.1f} ms/step  {b / dt:8.1f} images/s per GPU{mem}")
        except torch.OutOfMemoryError:
            print(f"batch {b:4d}: out of memory")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
