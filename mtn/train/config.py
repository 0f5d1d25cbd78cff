"""JobConfig: the fields and checks both Ray Train jobs share (run, optimisation, logging, checkpoints, resume,
cluster, tracking). TrainConfig (mtn/train_config.py) and FinetuneConfig (mtn/finetune_config.py) extend it; the
loader and the path/MLflow-default resolution (RunConfig) are mtn/config.py's."""

from __future__ import annotations

from typing import ClassVar

from mtn.config import PRECISIONS, RunConfig

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


class JobConfig(RunConfig):
    """What both Ray Train jobs share (jobs/train_mtn.py, jobs/finetune_unet.py). batch_size is GLOBAL."""

    PATH_KEYS: ClassVar[tuple[str, ...]] = ("output_dir", "storage_path")
    ALLOWED_PRECISIONS: ClassVar[tuple[str, ...]] = PRECISIONS

    seed: int = 0
    # --- optimisation
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after linear warmup)
    lr_min_ratio: float = 0.01  # cosine ends at lr * lr_min_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 32
    max_steps: int = 200
    # --- logging / validation / checkpoints
    log_every: int = 10  # train metrics to MLflow every N steps (val steps always)
    val_every: int = 50
    checkpoint_every: int = 50
    num_checkpoints_to_keep: int = 2
    # a re-run with the same name + storage_path: auto (resume if the config matches the checkpoint's, else refuse
    # naming the changed keys) | never (delete the run's checkpoints, start at step 0) | force (resume anyway);
    # the keys that may change without refusing: mtn/train/resume.py RESUMABLE
    resume: str = "auto"
    checkpoint_staging_dir: str | None = None  # where ranks write a checkpoint before Ray stores it (free space is
    #                                            checked first): an absolute path on the worker nodes;
    #                                            None: the system temp dir ($TMPDIR or /tmp)
    # --- distributed (Ray Train + DeepSpeed)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0
    # more Ray resources each worker needs, e.g. {A100: 1} to land only on nodes started with
    # `ray start --resources='{"A100": 8}'` (KubeRay: rayStartParams.resources); {} asks for CPU/GPU only
    worker_resources: dict[str, float] = {}
    # how Ray places the workers' bundles on nodes: PACK (fewest nodes; default), SPREAD (as many nodes as it can),
    # STRICT_PACK (one node or wait), STRICT_SPREAD (one worker per node or wait for nodes)
    placement_strategy: str = "PACK"
    zero_stage: int = 0  # 0-3
    offload_optimizer: bool = False
    precision: str = "fp32"  # mtn/train/precision.py
    max_failures: int = 0
    storage_path: str = "{output_dir}/ray_results"  # local path or s3://
    ray_address: str | None = None  # None: $RAY_ADDRESS or a local cluster
    stop_timeout_s: float = 300.0  # after SIGTERM: time to checkpoint at a step boundary before exiting
    #                               without one (mtn/train/preemption.py); a second SIGTERM exits at once
    # --- registry: the MLflow registered model the job's final model becomes a new version of; null: not registered
    register_model: str | None = None

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0-3, got {self.zero_stage}"),
            (self.precision in self.ALLOWED_PRECISIONS,
             f"precision must be {'|'.join(self.ALLOWED_PRECISIONS)}, got {self.precision!r}"),
            (self.lr_schedule in ("constant", "cosine"), f"lr_schedule must be constant|cosine, got {self.lr_schedule!r}"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
            (self.placement_strategy in PLACEMENT_STRATEGIES,
             f"placement_strategy must be {'|'.join(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}"),
            (all(v > 0 for v in self.worker_resources.values()) and not {"CPU", "GPU"} & set(self.worker_resources),
             f"worker_resources takes custom resources > 0 (CPU/GPU come from cpus_per_worker/gpus_per_worker), "
             f"got {self.worker_resources}"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (min(self.val_every, self.checkpoint_every, self.log_every) >= 1,
             "val_every, checkpoint_every and log_every must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.lr_min_ratio <= 1.0, "lr_min_ratio must be in [0, 1]"),
            (self.resume in ("auto", "never", "force"), f"resume must be auto|never|force, got {self.resume!r}"),
            (self.register_model is None or bool(self.register_model.strip()),
             "register_model must be a non-empty name or null"),
        ]
