"""Running a Ray Train job: `fit` (the TorchTrainer both jobs run), the one-line user errors from its workers, and
the summary a job prints at the end."""

from __future__ import annotations

import sys
from collections.abc import Callable

from mtn.errors import MTNError
from mtn.train.cluster import local_cpus, ray_session, worker_env


def run_config(cfg, callbacks: list | None = None):
    """Ray Train's RunConfig for cfg (name, storage_path, max_failures, num_checkpoints_to_keep, use_gpu): the
    workers' environment comes from here (mtn/train/cluster.py), not from whoever started Ray."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=cfg.name, storage_path=cfg.storage_path,
                     failure_config=FailureConfig(max_failures=cfg.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
                     callbacks=callbacks, worker_runtime_env={"env_vars": worker_env(cfg.use_gpu)})


def scaling_config(cfg):
    """Ray Train's ScalingConfig for cfg: num_workers workers of cpus_per_worker CPUs (+ gpus_per_worker GPUs) and
    worker_resources each, placed by placement_strategy."""
    from ray.train import ScalingConfig

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}),
                 **cfg.worker_resources}
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                         placement_strategy=cfg.placement_strategy)


def fit(train_loop, cfg, callbacks: list | None = None, on_ray_ready: Callable[[], None] | None = None):
    """Run `train_loop(cfg.to_dict())` on cfg.num_workers Ray Train workers; -> the Ray Train Result.
    cfg needs: name, storage_path, num_workers, use_gpu, cpus_per_worker, gpus_per_worker, worker_resources,
    placement_strategy, max_failures,
    num_checkpoints_to_keep, ray_address, resume, max_steps. First, before Ray starts, the run's latest checkpoint
    is checked against cfg (mtn/train/resume.py). A running Ray (a sweep's, a test session's) is used as it is and
    left running; a Ray started here is shut down at the end. An MTNError raised in a worker comes back as MTNError
    (one line)."""
    from ray.train.torch import TorchTrainer

    from mtn.train.resume import check_resume

    check_resume(cfg)
    tidy_checkpoints(cfg)  # leftovers of an earlier run's lost ranks
    with ray_session(cfg.ray_address, local_cpus(cfg.num_workers * cfg.cpus_per_worker), cfg.use_gpu,
                     log_to_driver=True):
        if on_ray_ready is not None:  # e.g. mtn.train.preemption re-installs its SIGTERM handler over ray.init's
            on_ray_ready()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg.to_dict(),
            scaling_config=scaling_config(cfg),
            run_config=run_config(cfg, callbacks),
        )
        try:
            # a Ray started here is shut down on the way out: that stops the workers' progress-bar forwarding
            # before the summary prints
            result = trainer.fit()
        except Exception as e:  # ray.train.TrainingFailedError: a worker's MTNError is a user error, said in one line
            message = worker_user_error(e)
            if message is None:
                raise
            raise MTNError(f"a training worker stopped: {message}") from None
    tidy_checkpoints(cfg)
    return result


def tidy_checkpoints(cfg) -> None:
    """Remove the run's checkpoint folders Ray Train never registered (a rank lost while reporting: its node died),
    saying so; a storage error only warns (the run itself is done)."""
    from mtn.train.resume import remove_unregistered_checkpoints

    try:
        removed = remove_unregistered_checkpoints(cfg.storage_path, cfg.name)
    except Exception as e:  # noqa: BLE001 (tidying must not fail a finished run)
        print(f"warning: could not check run {cfg.name!r} for unregistered checkpoints: {e}", file=sys.stderr)
        return
    if removed:
        print(f"removed {len(removed)} checkpoint folder(s) of run {cfg.name!r} that Ray Train never registered (a "
              f"rank was lost while writing them, so no resume reads them): {', '.join(removed)}")


def fit_or_preempt(train_loop, cfg):
    """fit() as a job's driver runs it: a SIGTERM (`ray job stop`, eviction) checkpoints the run and raises
    mtn.train.preemption.Preempted once fit returns (cfg also needs stop_timeout_s; see mtn/train/preemption.py)."""
    from mtn.train.preemption import StopOnSigterm

    stop = StopOnSigterm(cfg.name, cfg.stop_timeout_s)
    with stop:
        result = fit(train_loop, cfg, on_ray_ready=stop.install)
    stop.raise_if_preempted(result, cfg.max_steps)
    return result


def exit_code(drive: Callable[[], int]) -> int:
    """A training driver's exit code: drive()'s own; 2 with one line for a user mistake (MTNError, also one raised
    in a worker); 143 with "preempted at step N" after a SIGTERM (the same command resumes)."""
    from mtn.train.preemption import EXIT_CODE, Preempted

    try:
        return drive()
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        return EXIT_CODE


def worker_user_error(error: BaseException) -> str | None:
    """The message of an MTNError behind a Ray Train failure (WorkerGroupError.worker_failures hold the workers'
    exceptions, wrapped with their traceback text), or None."""
    failures = list(getattr(error, "worker_failures", {}).values())
    failures += [getattr(error, "controller_failure", None)]
    for failure in failures:
        seen = 0
        while failure is not None and seen < 10:
            failure = getattr(failure, "_base_exc", failure)  # ray's UserExceptionWithTraceback
            if isinstance(failure, MTNError):
                return str(failure)
            failure, seen = failure.__cause__ or failure.__context__, seen + 1
    return None


def print_summary(job: str, summary: dict, metrics: dict, footer: tuple[str, ...] = ()) -> None:
    lines = ["", f"== {job} finished =="] + [f"  {k:28s} {v}" for k, v in summary.items()]
    lines += [f"  {k:28s} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)] + list(footer)
    # sys.stdout, not print: Ray's progress-bar manager patches print() to redraw bars around each line
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
