"""TrainConfig: the MTN training job's config (jobs/train_mtn.py, jobs/extract_features.py, the sweep's trials).
The shared Ray Train fields and checks come from mtn.train.config.JobConfig, the loader is mtn.config.load_config."""

from __future__ import annotations

from typing import ClassVar

from mtn.config import SHARED_DATA, Strs
from mtn.train.config import JobConfig


class TrainConfig(JobConfig):
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir", "storage_path", "feature_cache", "val_feature_cache")

    name: str = "mtn-local"
    output_dir: str = "outputs/local"  # final translator goes to {output_dir}/translator
    # --- encoders: hub id, local path, or tiny:<t5|clip|bert|xlmr>
    source_encoder: str = "tiny:t5"
    source_subfolder: str | None = None
    source_revision: str | None = None  # hub branch, tag or commit of the source LM; None: main (pin a commit)
    source_max_length: int = 32
    source_prefix: str = ""
    target_encoder: str = "tiny:clip"
    target_subfolder: str | None = None
    target_revision: str | None = None  # hub branch, tag or commit of the target encoder; None: main
    target_max_length: int = 77
    target_prefix: str = ""
    encoder_dtype: str = "float32"
    bundle_source_encoder: bool = False  # copy the source LM into the translator folder
    # --- data: `corpus` (monolingual, same sentence to both encoders) or source_file + target_file (parallel)
    corpus: str | None = None  # a path, s3:// URI, or generated:<N> (N template captions)
    source_file: str | None = None
    target_file: str | None = None
    val_source_file: str | None = None  # explicit held-out split; else val_fraction of the training data
    val_target_file: str | None = None
    val_fraction: float = 0.05
    max_val_samples: int = 1000
    max_train_samples: int | None = None
    source_lang: str = ""  # used by path templates ({source_lang}); "all" = every language in `languages`
    languages: Strs = []  # what source_lang=all stands for: *_file paths become one file per language
    language_mix: str = "interleave"  # source_lang=all training pairs: interleave (each caption in every language)
    #                                   | rotate (caption i in language i mod k: each caption once); val: always all
    # --- feature cache (jobs/extract_features.py writes it; train_mtn reads it and then never loads the encoders)
    feature_cache: str | None = None  # features of the training pairs: local folder or s3://
    val_feature_cache: str | None = None  # features of the val pairs (val_*_file, or the val split)
    feature_dtype: str = "float16"  # float16 | bfloat16
    extract_workers: int = 2  # Ray Data encoder actors
    extract_batch_size: int = 64
    extract_shard_rows: int = 2048
    extract_gpus_per_worker: float = 0.0
    cache_target_padding: bool = True  # keep target features at padded positions (mse_on_mask=false needs them;
    #                                    false zero-pads them: faster extraction on short captions, smaller files: BENCHMARKS.md)
    data_root: str = "${MTN_SHARED_DATA:-" + SHARED_DATA + "}"
    # --- model: the MTN, or a baseline fitted in closed form (mtn/baselines.py) for comparison
    method: str = "mtn"  # mtn | linear | pooled_linear
    ridge_alpha: float = 1e-3  # L2 of the linear baselines, relative to the mean feature energy (diag of X^T X)
    compare_linear: bool = True  # also fit the linear map on the training data and report the MTN's margin
    baseline_samples: int = 4096  # without a feature cache, fit it on this many encoded training pairs
    mtn_size: str = "mtn-3rm"
    num_modules: int | None = None  # overrides the named size
    hidden_dim: int | None = None
    dropout: float = 0.0
    block_layout: str = "gluegen"  # gluegen (the paper's residual modules) | mixer (pre-LN mixer blocks; mtn/model.py)
    decoder_modules: int | None = None  # N's modules/blocks (default: as M)
    standardize: bool = False  # per-channel source/target standardisation; losses in standardised units
    target_stats: bool = False  # M outputs shift + scale * body with per-position target statistics
    linear_skip: bool = False  # M = ridge-fitted linear map + gated mixer body (starts at the linear baseline)
    disc_hidden_dim: int = 256
    # --- losses (0 switches a term off; see mtn/losses.py for the defaults' reasons)
    loss_mse: float = 1.0
    loss_adv: float = 0.0
    loss_rec: float = 0.1
    loss_cycle: float = 0.1
    mse_on_mask: bool = False
    # --- tracking
    mlflow_parent_run_id: str | None = None  # set by jobs/sweep_mtn.py: this run is nested under the sweep's run
    # register_model (JobConfig) names the registered model the translator becomes a new version of; the alias
    # moves to that version (null: none). A sweep's trials never register: the sweep registers its gated best.
    register_alias: str | None = "champion"

    def checks(self) -> list[tuple[bool, str]]:
        losses = (self.loss_mse, self.loss_adv, self.loss_rec, self.loss_cycle)
        return super().checks() + [
            (self.batch_size >= self.num_workers, f"batch_size ({self.batch_size}) is global and must be >= "
                                                   f"num_workers ({self.num_workers})"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.block_layout in ("gluegen", "mixer"), f"block_layout must be gluegen|mixer, got {self.block_layout!r}"),
            (self.language_mix in ("interleave", "rotate"),
             f"language_mix must be interleave|rotate, got {self.language_mix!r}"),
            (self.method in ("mtn", "linear", "pooled_linear"),
             f"method must be mtn|linear|pooled_linear, got {self.method!r}"),
            (self.feature_dtype in ("float16", "bfloat16"), f"feature_dtype must be float16|bfloat16, "
                                                             f"got {self.feature_dtype!r}"),
            (min(self.extract_workers, self.extract_batch_size, self.extract_shard_rows) >= 1,
             "extract_workers, extract_batch_size and extract_shard_rows must be >= 1"),
            (self.ridge_alpha >= 0, "ridge_alpha must be >= 0"),
            (min(losses) >= 0, "loss weights must be >= 0"),
            (max(losses) > 0, "all loss weights are 0"),
            (bool(self.corpus) != bool(self.source_file or self.target_file),
             "give either `corpus` (monolingual) or `source_file` + `target_file` (parallel), not both/neither"),
            (bool(self.source_file) == bool(self.target_file), "parallel data needs both source_file and target_file"),
            (self.register_alias is None or bool(self.register_alias.strip()),
             "register_alias must be a non-empty name or null"),
        ]

    @property
    def loss_weights(self) -> dict:
        return {"mse": self.loss_mse, "adv": self.loss_adv, "rec": self.loss_rec, "cycle": self.loss_cycle}
