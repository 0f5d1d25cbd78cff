"""Precompute VAE latents + text features of webdataset shards once, for finetune runs that read them.

    python jobs/precompute_latents.py                            # finetune default config -> outputs/.../latents
    python jobs/precompute_latents.py --config jobs/configs/finetune_sd14_t5.yaml precomputed=s3://bucket/latents
    python jobs/finetune_unet.py precomputed=outputs/finetune-local/latents      # then train from them

Takes the finetune config (same pipeline, translator, shards, resolution): Ray Data runs `precompute_workers`
encoder actors over the shard list; each streams its shards through the training reader (center crop, no flip),
encodes images with the frozen VAE (posterior mean and std, so training still samples) and captions with the
frozen text route, and writes one safetensors file per shard (local or s3://). The manifest is written last;
finetune_unet refuses latents made for another pipeline, translator, resolution or text route.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mtn.cli import job_parser
from mtn.config import load_config
from mtn.data.latents import write_file, write_latents_manifest
from mtn.errors import MTNError
from mtn.finetune import conditioning, ensure_shards, setup_models
from mtn.finetune_config import FinetuneConfig
from mtn.train.cluster import ray_session

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_local.yaml"


def text_kind(cfg: FinetuneConfig) -> str:
    return "source" if cfg.train_mtn else "prompt_embeds"


class EncodeShards:
    """Ray Data actor: the frozen VAE + text route, loaded once; shard URLs in -> one latent file per shard out."""

    def __init__(self, config: dict, out: str):
        self.cfg, self.out = FinetuneConfig(**config), out
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.cfg.use_gpu else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipe, _, self.translator = setup_models(self.cfg, self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        from mtn.data.loader import make_loader
        from mtn.data.shards import ShardStream, StreamConfig

        stream_cfg = StreamConfig(resolution=self.cfg.resolution, center_crop=True, random_flip=False,
                                  shuffle_buffer=1, seed=0, min_caption_chars=self.cfg.min_caption_chars,
                                  min_image_size=self.cfg.min_image_size)
        names, rows = [], []
        for shard in batch["shard"]:
            parts: dict[str, list[torch.Tensor]] = {}
            keys: list[str] = []
            loader = make_loader(ShardStream([str(shard)], stream_cfg), 16, num_workers=0, drop_last=False)
            for b in loader:
                post = self.pipe.vae.encode(b["pixel_values"].to(self.device, self.dtype)).latent_dist
                scale = self.pipe.vae.config.scaling_factor
                parts.setdefault("latent_mean", []).append((post.mean * scale).half().cpu())  # [b, 4, h, w]
                parts.setdefault("latent_std", []).append((post.std * scale).half().cpu())
                cond = conditioning(self.cfg, self.pipe, self.translator, b["captions"], self.device)
                if isinstance(cond, tuple):  # the MTN trains later: keep its input, not its output
                    parts.setdefault("source", []).append(cond[0].half().cpu())  # [b, S_s, d_s]
                    parts.setdefault("source_mask", []).append(cond[1].cpu())  # [b, S_s]
                else:
                    parts.setdefault("text", []).append(cond.half().cpu())  # [b, S_t, d_t]
                keys += b["keys"]
            name = Path(str(shard).split("?")[0]).stem + ".safetensors"
            if keys:
                write_file(self.out, name, {k: torch.cat(v) for k, v in parts.items()}, keys)
            names.append(name)
            rows.append(len(keys))
        return {"name": names, "rows": rows}


def run(cfg: FinetuneConfig, out: str) -> dict:
    import ray

    shards = ensure_shards(cfg)
    with ray_session(cfg.ray_address, use_gpu=bool(cfg.precompute_gpus_per_worker), log_to_driver=True):
        ds = ray.data.from_items([{"shard": s} for s in shards])
        ds = ds.map_batches(EncodeShards, fn_constructor_kwargs={"config": cfg.to_dict(), "out": out}, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=cfg.precompute_workers),
                            num_gpus=cfg.precompute_gpus_per_worker or None)
        files = sorted(({"name": r["name"], "rows": int(r["rows"])} for r in ds.iter_rows() if int(r["rows"])),
                       key=lambda f: f["name"])
    if not files:
        raise MTNError(f"no samples could be read from {cfg.train_shards}")
    record = {"pipeline": cfg.pipeline, "translator": cfg.translator, "resolution": cfg.resolution,
              "text": text_kind(cfg), "source_shards": cfg.train_shards, "files": files,
              "rows": sum(f["rows"] for f in files)}
    write_latents_manifest(out, record)
    return record


def main(argv=None) -> int:
    args = job_parser(__doc__, DEFAULT_CONFIG, "finetune YAML config", "precomputed=s3://b/l").parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
        out = cfg.precomputed or f"{cfg.output_dir}/latents"
        if "://" not in out:
            out = str(Path(out).resolve())
            Path(out).mkdir(parents=True, exist_ok=True)
        cfg.resolve_paths()  # Ray workers may run in another directory
        record = run(cfg, out)
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n== precompute_latents finished ==\n  latents   {out}\n  files     {len(record['files'])}\n"
          f"  samples   {record['rows']}\n  train with: python jobs/finetune_unet.py precomputed={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
