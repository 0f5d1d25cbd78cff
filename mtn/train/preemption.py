"""Preemption: SIGTERM to the driver (`ray job stop`, pod eviction) checkpoints the run and exits cleanly.

    driver                                     Ray Train workers (every rank, at each step boundary)
    ------                                     ------------------------------------------------------
    SIGTERM -> handler sets an event           StopSignal.check(): rank 0 asks whether the named actor exists
    watcher thread: creates the named Ray        (one GCS lookup per `poll_s`), then an all-reduce (MAX) so
      actor "mtn-stop:<run name>" (the flag)     that all ranks stop at the same step
    waits for fit() to return                  -> checkpoint through ray.train.report, return
    -> Preempted("preempted at step N ...")    (the final step is never cut: it publishes instead)
    -> the job exits 143 (128 + SIGTERM)

A second SIGTERM, or no clean stop within `timeout_s` of the first, exits at once (143) without a new checkpoint:
the next run resumes from the last periodic one. Re-running the same command (same name + storage_path)
resumes from the checkpoint. The flag is a named actor, not a file, so that workers on other nodes see it
without touching the storage; it lives in the job's namespace and dies with the driver.

Grace periods: `ray job stop` SIGKILLs the driver RAY_JOB_STOP_WAIT_TIME_S (default 3) seconds after its SIGTERM,
Kubernetes terminationGracePeriodSeconds (default 30) after its own: raise them above one step + one checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell shows for a job ended by SIGTERM


class Preempted(Exception):
    """The run stopped at a checkpoint because the driver was asked to stop (SIGTERM)."""


def flag_name(run_name: str) -> str:
    return f"mtn-stop:{run_name}"


class _Flag:
    """The stop flag: it exists only once a stop was requested."""

    def ping(self) -> bool:
        return True


def raise_flag(run_name: str, wait_s: float = 60.0):
    """Create the named flag actor (waits for Ray to be up: SIGTERM may come while it starts); -> its handle, which
    the caller must keep: Ray destroys a named actor that is not detached once no handle to it is left, so a dropped
    handle lowers the flag again at once (workers that had not polled yet never saw it)."""
    import ray

    deadline = time.monotonic() + wait_s
    while not ray.is_initialized():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray was not up within {wait_s:g} s")
        time.sleep(0.1)
    flag = ray.remote(num_cpus=0)(_Flag).options(name=flag_name(run_name), get_if_exists=True).remote()
    ray.get(flag.ping.remote(), timeout=wait_s)
    return flag


class StopOnSigterm:
    """Driver side, around `fit` (as mtn.train.fit.fit_or_preempt does): SIGTERM raises the stop flag instead of
    killing the process.

        stop = StopOnSigterm(cfg.name, cfg.stop_timeout_s)
        with stop:
            result = fit(train_loop, cfg, on_ray_ready=stop.install)   # ray.init installs its own handler
        stop.raise_if_preempted(result, cfg.max_steps)

    `raise_flag(name)` (-> the flag's handle, kept in `self.flag`) and `exit_now(code)` are replaceable for tests."""

    def __init__(self, run_name: str, timeout_s: float = 300.0, raise_flag: Callable[[str], None] = raise_flag,
                 exit_now: Callable[[int], None] = os._exit):
        self.run_name, self.timeout_s = run_name, timeout_s
        self._raise_flag, self._exit_now = raise_flag, exit_now
        self.requested = False  # set by the first SIGTERM
        self._wake, self._done = threading.Event(), threading.Event()
        self._previous = None
        self._watcher: threading.Thread | None = None
        self.flag = None  # the raised flag's actor handle: held until the driver exits (dropping it lowers the flag)

    def __enter__(self) -> StopOnSigterm:
        self._previous = signal.getsignal(signal.SIGTERM)
        self.install()
        self._watcher = threading.Thread(target=self._watch, name="mtn-stop-watcher", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._wake.set()  # releases the watcher thread
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def install(self) -> None:
        """(Re)install the handler; signal handlers can only be set from the main thread (not in sweep trials)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        # a signal handler only flags; the watcher thread does the Ray calls
        if self.requested:
            sys.stderr.write("second SIGTERM: exiting now, without a new checkpoint\n")
            sys.stderr.flush()
            self._exit_now(EXIT_CODE)
            return
        sys.stderr.write(f"SIGTERM: checkpointing at the next step boundary, then exiting "
                         f"(a second SIGTERM exits at once; giving up after {self.timeout_s:g} s)\n")
        sys.stderr.flush()
        self.requested = True
        self._wake.set()

    def _watch(self) -> None:
        self._wake.wait()
        if self._done.is_set():
            return
        deadline = time.monotonic() + self.timeout_s
        while not self._done.is_set():
            try:
                self.flag = self._raise_flag(self.run_name)
                sys.stderr.write("stop flag raised: every rank checkpoints at its next step boundary\n")
                break
            except Exception as e:  # noqa: BLE001 - retried (a loaded cluster); the timeout below still ends the process
                sys.stderr.write(f"could not raise the stop flag ({type(e).__name__}: {e}); retrying\n")
                if self._done.wait(min(5.0, max(0.0, deadline - time.monotonic()))) or time.monotonic() > deadline:
                    break
            finally:
                sys.stderr.flush()
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            sys.stderr.write(f"no checkpoint within {self.timeout_s:g} s of SIGTERM: exiting now; the next run "
                             "resumes from the last periodic checkpoint\n")
            sys.stderr.flush()
            self._exit_now(EXIT_CODE)

    def raise_if_preempted(self, result, max_steps: int) -> None:
        """After fit: a stop that cut the run short -> Preempted (a run that still reached max_steps publishes)."""
        if not self.requested:
            return
        step = (getattr(result, "metrics", None) or {}).get("step", 0)
        if step >= max_steps:
            return
        where = getattr(getattr(result, "checkpoint", None), "path", None)
        raise Preempted(f"preempted at step {step} (SIGTERM); checkpoint {where}; re-run the same command to "
                        "resume from there")


class StopSignal:
    """Worker side: has the driver asked this run to stop? `check()` must be called by every rank at the same
    step boundaries (it is a collective when world > 1); once True it stays True."""

    def __init__(self, run_name: str, device=None, poll_s: float = 1.0):
        self.name, self.device, self.poll_s = flag_name(run_name), device, poll_s
        self.stopping = False
        self._next_poll = 0.0

    def _flag_raised(self) -> bool:
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        import ray

        try:
            ray.get_actor(self.name)
            return True
        except ValueError:  # no such actor: no stop requested
            return False

    def check(self) -> bool:
        if self.stopping:
            return True
        import torch.distributed as dist

        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        raised = self._flag_raised() if not multi or dist.get_rank() == 0 else False  # rank 0 asks Ray
        if multi:
            import torch

            flag = torch.tensor([1.0 if raised else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the same answer on every rank, at the same step
            raised = flag.item() > 0
        self.stopping = raised
        return raised
