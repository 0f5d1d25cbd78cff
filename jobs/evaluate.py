"""Evaluate a translator: alignment per language (+ t-SNE map) and, with a pipeline, generation metrics.

    python jobs/evaluate.py                                    # default translator + tiny pipeline (evaluate_local.yaml)
    python jobs/evaluate.py --config jobs/configs/evaluate_multi30k.yaml translator=models:/mtn-translator-de/1
    python jobs/evaluate.py --compare RUN_ID RUN_ID ...        # one side-by-side table of their MLflow metrics

Alignment: token MSE, pooled cosine, R@1/R@5 (mtn/metrics.py, the training job's own definitions) of the
translated source captions against the target encoder's, per language of a parallel test set; a t-SNE map of
pooled source, target and translated features. Generation, per guidance scale: images for a prompt set through
the translator (fixed seeds), their CLIP score against the (English reference) prompts, the multilingual CLIP
score against the prompts themselves, and FID against a reference: `native` = the same prompts and seeds through
the pipeline's own text encoder (how far the translated route is from the route the UNet was trained on), an
image folder or precomputed .npz statistics. Everything is logged to one MLflow run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from mtn.cli import job_parser
from mtn.config import load_config
from mtn.errors import MTNError
from mtn.eval.config import EvalConfig
from mtn.eval.report import compare_table, fetch_runs, tables

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "evaluate_local.yaml"
ALIGN_COLUMNS = ["language", "pairs", "token_mse", "pooled_cosine", "r@1", "r@5"]
GEN_COLUMNS = ["guidance", "route", "images", "clip_score", "mclip_score", "fid"]


# ----------------------------------------------------------------------------------------------- setup
def check_data(cfg: EvalConfig) -> None:
    """Every text file the run reads exists, before a translator is trained or loaded: a missing Multi30k /
    PartiPrompts file fails at once, naming the `mtn data fetch` command that downloads it."""
    from mtn.data.fetch import require_files

    paths = [] if cfg.align_feature_cache else [cfg.for_lang(t, lang) for lang in cfg.languages
                                                for t in (cfg.align_source_file, cfg.align_target_file)]
    require_files(paths + ([cfg.prompts, cfg.prompts_reference] if cfg.pipeline else []))


def setup_translator(cfg: EvalConfig):
    from jobs.bootstrap import ensure_default_translator
    from mtn.translator import load_translation_model, load_translator, read_translator_manifest
    from mtn.uris import MLFLOW_SCHEMES, fetch_folder

    if cfg.train_if_missing and not cfg.translator.startswith(("s3://", *MLFLOW_SCHEMES)):
        ensure_default_translator(cfg.translator)
    folder = fetch_folder(cfg.translator, "translator.json")
    if cfg.align_feature_cache and not cfg.pipeline:
        # the caches hold the source LM's outputs and nothing generates: skip loading the LM (T5-3B: minutes, GBs)
        return SimpleNamespace(mtn=load_translation_model(folder), manifest=read_translator_manifest(folder),
                               source_encoder=None)
    return load_translator(folder, device=cfg.device, source_encoder=cfg.source_encoder)


def setup_target_encoder(cfg: EvalConfig, translator):
    from mtn.encoders import load_text_encoder

    spec = translator.manifest.get("target_encoder") or {}
    if not spec and not cfg.target_encoder:
        raise MTNError("the translator records no target encoder: set target_encoder= to score alignment")
    return load_text_encoder(cfg.target_encoder or spec["name_or_path"], max_length=spec.get("max_length", 77),
                             prefix=spec.get("prefix", ""), device=cfg.device)


def setup_pipeline(cfg: EvalConfig):
    from mtn.pipeline import load_pipeline
    from mtn.uris import MLFLOW_SCHEMES, fetch_folder

    remote = cfg.pipeline.startswith(("s3://", *MLFLOW_SCHEMES))
    where = str(fetch_folder(cfg.pipeline, "model_index.json")) if remote else cfg.pipeline
    return load_pipeline(where, device=cfg.device, scheduler=cfg.scheduler)


# ----------------------------------------------------------------------------------------------- alignment
def language_rows(cfg: EvalConfig, lang: str, translator, target) -> dict[str, torch.Tensor]:
    """Cache-shaped rows (source, source_mask, target, target_mask) of one language's parallel test set."""
    from mtn.data.corpus import load_pairs
    from mtn.data.features import encode_rows, load_features, read_feature_manifest

    cache = cfg.for_lang(cfg.align_feature_cache, lang)
    if cache:
        manifest = read_feature_manifest(cache)
        spec = translator.manifest["source_encoder"]
        for key in ("name_or_path", "max_length", "prefix"):
            if manifest["source_encoder"][key] != spec[key]:
                raise MTNError(f"{cache} was extracted with another source encoder {key} "
                               f"({manifest['source_encoder'][key]!r}) than the translator's ({spec[key]!r})")
        return load_features(cache, manifest, rows=cfg.max_align_samples)
    pairs = load_pairs(cfg.for_lang(cfg.align_source_file, lang), cfg.for_lang(cfg.align_target_file, lang))
    return encode_rows(translator.source_encoder, target, pairs[: cfg.max_align_samples])


def alignment(cfg: EvalConfig, translator, out: Path) -> tuple[list[dict], Path | None]:
    from mtn.baselines import predict
    from mtn.eval.tsne import pooled, tsne_map
    from mtn.metrics import alignment_metrics

    target = None if cfg.align_feature_cache else setup_target_encoder(cfg, translator)
    rows, groups = [], {}
    for lang in tqdm(cfg.languages, desc="alignment", unit="language"):
        feats = language_rows(cfg, lang, translator, target)
        pred = predict(translator.mtn, feats)  # [N, S_t, d_t]
        rows.append({"language": lang, "pairs": len(pred),
                     **alignment_metrics(pred, feats["target"].float(), feats["target_mask"])})
        n = cfg.tsne_samples
        groups[lang] = {"source": pooled(feats["source"][:n], feats["source_mask"][:n]),
                        "target": pooled(feats["target"][:n], feats["target_mask"][:n]),
                        "translated": pooled(pred[:n], feats["target_mask"][:n])}
    plot = tsne_map(groups, out / "tsne.png", seed=0) if cfg.tsne else None
    return rows, plot


# ----------------------------------------------------------------------------------------------- generation
def render(cfg: EvalConfig, pipe, translator, prompts: list[str], guidance: float, folder: Path) -> list:
    """Images for every prompt (image i: seed + i), in batches, saved as folder/00000.png ..."""
    from mtn.pipeline import generate

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    kw = {"num_inference_steps": cfg.steps, "guidance_scale": guidance, "height": cfg.height or size,
          "width": cfg.width or size}
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in tqdm(range(0, len(prompts), cfg.batch_size), desc=f"{folder.name} batches", leave=False):
        chunk = prompts[i:i + cfg.batch_size]
        images += generate(pipe, translator, chunk, seeds=[cfg.seed + i + k for k in range(len(chunk))], **kw)
    for i, im in enumerate(images):
        im.save(folder / f"{i:05d}.png")
    return images


def generation(cfg: EvalConfig, pipe, translator, out: Path) -> tuple[list[dict], dict]:
    from mtn.diffusion import image_grid
    from mtn.eval.clip import clip_score_torchmetrics, multilingual_clip_score, resolve_clip, resolve_mclip
    from mtn.eval.fid import (
        build_feature_extractor,
        feature_stats,
        frechet_distance,
        image_features,
        reference_stats,
        save_stats,
    )
    from mtn.eval.prompts import read_parallel

    prompts, reference = read_parallel(cfg.prompts, cfg.prompts_reference, cfg.max_prompts)
    cache = out / "metric-models"
    clip = resolve_clip(cfg.clip_model, cache) if cfg.clip_model else None
    mclip = resolve_mclip(cfg.mclip_model, cache, clip) if cfg.mclip_model and clip else None
    if cfg.mclip_model and not clip:
        print("note: no multilingual CLIP score: it needs clip_model for the image side")
    extractor = build_feature_extractor(cfg.fid_features) if cfg.fid_reference else None
    fixed = None
    if cfg.fid_reference and cfg.fid_reference != "native":
        fixed = reference_stats(cfg.fid_reference, extractor, progress=True)
        if not cfg.fid_reference.endswith(".npz"):  # reusable: fid_reference=<output_dir>/fid_reference.npz
            save_stats(out / "fid_reference.npz", *fixed)
    rows, grids = [], {}
    routes = [("translated", translator, prompts)] + ([("native", None, reference)]
                                                      if cfg.fid_reference == "native" else [])
    for g in tqdm(cfg.guidance_scales, desc="generation", unit="guidance scale"):
        stats = {}
        for route, tr, texts in routes:
            images = render(cfg, pipe, tr, texts, g, out / "images" / f"{route}-g{g:g}")
            row = {"guidance": g, "route": route, "images": len(images)}
            if clip:
                row["clip_score"] = clip_score_torchmetrics(images, reference, clip)
            if mclip:
                row["mclip_score"] = multilingual_clip_score(images, prompts, clip, mclip)
            if extractor is not None:
                stats[route] = feature_stats(image_features(extractor, images))
            rows.append(row)
            grids[f"{route}-g{g:g}"] = image_grid(images[:16], cols=min(8, len(images)))
        for row in rows[-len(routes):]:
            ref = fixed or stats.get("native")
            if ref is not None and not (fixed is None and row["route"] == "native"):
                row["fid"] = frechet_distance(*stats[row["route"]], *ref)
    notes = {"fid_features": extractor.description if extractor is not None else None,
             "fid_reference": cfg.fid_reference, "clip_model": clip, "mclip_model": mclip, "prompts": len(prompts)}
    return rows, {"grids": grids, "notes": notes}


# ----------------------------------------------------------------------------------------------- driver
def evaluate(cfg: EvalConfig) -> dict:
    import mlflow

    from mtn.train.tracking import MLflowTracker

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    translator = setup_translator(cfg)
    tracker = MLflowTracker(cfg, job="evaluate")
    mlflow.set_tag("mtn.translator", cfg.translator)
    try:
        summary = run_metrics(cfg, translator, out)
    except BaseException:
        mlflow.end_run(status="FAILED")  # kept in MLflow as failed, with whatever it had logged
        raise
    print(f"MLflow run {tracker.run_id} ({cfg.mlflow_tracking_uri})")
    mlflow.end_run()
    return summary


def run_metrics(cfg: EvalConfig, translator, out: Path) -> dict:
    import mlflow

    align, plot = alignment(cfg, translator, out)
    metrics = {f"align/{r['language']}/{k}": v for r in align for k, v in r.items() if k not in ("language", "pairs")}
    summary = {"alignment": align}
    for name, (csv_text, md) in {"alignment": tables(align, ALIGN_COLUMNS)}.items():
        (out / f"{name}.csv").write_text(csv_text)
        (out / f"{name}.md").write_text(md)
    print("\nalignment\n" + (out / "alignment.md").read_text())
    if cfg.pipeline:
        gen, extra = generation(cfg, setup_pipeline(cfg), translator, out)
        metrics |= {f"gen/{r['route']}/g{r['guidance']:g}/{k}": r[k] for r in gen
                    for k in ("clip_score", "mclip_score", "fid") if r.get(k) is not None}
        csv_text, md = tables(gen, GEN_COLUMNS)
        (out / "generation.csv").write_text(csv_text)
        (out / "generation.md").write_text(md)
        for key, grid in extra["grids"].items():
            grid.save(out / f"grid-{key}.png")
            mlflow.log_artifact(str(out / f"grid-{key}.png"), "grids")
        mlflow.set_tags({f"mtn.{k}": str(v) for k, v in extra["notes"].items()})
        summary |= {"generation": gen, "notes": extra["notes"]}
        print("generation\n" + md + f"FID features: {extra['notes']['fid_features']}")
    mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()})
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    for f in ("alignment.csv", "alignment.md", "generation.csv", "generation.md", "metrics.json", "tsne.png"):
        if (out / f).is_file():
            mlflow.log_artifact(str(out / f))
    if plot:
        print(f"t-SNE map: {plot}")
    return summary


def main(argv=None) -> int:
    p = job_parser(__doc__, DEFAULT_CONFIG, "evaluation YAML", "max_prompts=4")
    p.add_argument("--compare", nargs="+", metavar="RUN_ID", help="print the runs' metrics side by side and exit")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --compare (default: the config's)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=EvalConfig).resolve_paths()
        if args.compare:
            print(compare_table(fetch_runs(args.tracking_uri or cfg.mlflow_tracking_uri, args.compare)), end="")
            return 0
        check_data(cfg)
        evaluate(cfg)
        return 0
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
