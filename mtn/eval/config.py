"""The evaluation job's config (jobs/evaluate.py): what to score, on which data, with which metric models."""

from __future__ import annotations

from mtn.config import SHARED_DATA, Floats, RunConfig, Strs

TINY_PIPELINE = "tiny:sd"  # mtn.tiny.sd.build_tiny_sd_pipeline: the UNet whose text encoder is tiny:clip


class EvalConfig(RunConfig):
    name: str = "mtn-eval-local"
    output_dir: str = "outputs/eval-local"
    data_root: str = "${MTN_SHARED_DATA:-" + SHARED_DATA + "}"
    translator: str = "outputs/local/translator"  # folder, s3://, runs:/..., models:/name/version
    train_if_missing: bool = False  # the default translator only: run `python jobs/train_mtn.py` first if absent
    source_encoder: str | None = None  # a local mirror of the translator's recorded source LM
    target_encoder: str | None = None  # a local mirror of its recorded target encoder (alignment needs it)
    device: str = "cpu"
    # The class defaults read the real sets under data_root (`mtn data fetch multi30k prompts` puts them there); the
    # embedded default, jobs/configs/evaluate_local.yaml, reads generated ones (`generated:<N>:<lang>`) instead.
    # --- alignment: per language, a parallel test set ({lang} is replaced by each language)
    languages: Strs = ["en", "de"]
    align_source_file: str = "{data_root}/multi30k/test_2016_flickr.{lang}.gz"
    align_target_file: str = "{data_root}/multi30k/test_2016_flickr.en.gz"
    align_feature_cache: str | None = None  # a jobs/extract_features.py cache per language instead of the text
    max_align_samples: int = 1000
    tsne: bool = True  # the t-SNE map of source, target and translated features (paper Fig. 8 / 11)
    tsne_samples: int = 300  # per language and role
    # --- generation: null pipeline skips it
    pipeline: str | None = TINY_PIPELINE  # a diffusers folder / URI taking prompt_embeds, or tiny:sd
    prompts: str = "{data_root}/prompts/PartiPrompts.tsv"  # .txt/.gz (one per line), PartiPrompts .tsv, COCO json
    prompts_reference: str | None = None  # parallel English prompts (CLIP score, native FID) when prompts are not
    max_prompts: int = 16
    guidance_scales: Floats = [1.5, 5.0, 7.5]  # the paper's
    scheduler: str = "default"  # default | ddim | pndm | plms | dpm
    steps: int = 25
    height: int | None = None  # None: the pipeline's default
    width: int | None = None
    seed: int = 0  # image i gets seed + i, for every guidance scale and route
    batch_size: int = 8
    clip_model: str | None = "tiny:clip-vit"  # a local CLIP folder (CLIPModel + CLIPProcessor) or tiny:clip-vit
    mclip_model: str | None = "tiny:mclip"  # a local multilingual CLIP text model folder, tiny:mclip, or null
    fid_reference: str | None = "native"  # native (the pipeline's own encoder) | image folder | .npz stats | null
    fid_features: str = "inception"  # inception:/path/pt_inception-2015-12-05-6726825d.pth | inception | tiny
    # --- tracking
    mlflow_experiment: str = "mtn-eval"

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.max_align_samples >= 2, "max_align_samples must be >= 2"),
            (self.max_prompts >= 1 and self.batch_size >= 1 and self.steps >= 1,
             "max_prompts, batch_size and steps must be >= 1"),
            (self.tsne_samples >= 2, "tsne_samples must be >= 2"),
            (bool(self.languages), "languages needs at least one language"),
            (bool(self.guidance_scales), "guidance_scales needs at least one value"),
            (not self.fid_reference or self.fid_reference == "native" or bool(self.fid_features),
             "fid_reference needs fid_features"),
        ]

    def for_lang(self, template: str | None, lang: str) -> str | None:
        return None if template is None else template.replace("{lang}", lang)
