"""Preemption: SIGTERM to the driver checkpoints at a step boundary and exits 143; the next run resumes there."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from mtn.train.preemption import EXIT_CODE, Preempted, StopOnSigterm, StopSignal, flag_name

ROOT = Path(__file__).parents[1]


class Calls:
    def __init__(self):
        self.flags, self.exits, self.event = [], [], threading.Event()

    def flag(self, name):
        self.flags.append(name)
        self.event.set()

    def exit(self, code):
        self.exits.append(code)
        self.event.set()


def wait_for(cond, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_first_sigterm_raises_the_flag_second_exits_at_once_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    calls = Calls()
    with StopOnSigterm("run-a", timeout_s=60, raise_flag=calls.flag, exit_now=calls.exit) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: calls.flags == ["run-a"])
        assert stop.requested and calls.exits == []  # the process lives on to checkpoint
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: calls.exits == [EXIT_CODE])
    assert signal.getsignal(signal.SIGTERM) == before


def test_no_clean_stop_within_the_timeout_exits():
    calls = Calls()
    with StopOnSigterm("run-b", timeout_s=0.2, raise_flag=calls.flag, exit_now=calls.exit):
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: calls.exits == [EXIT_CODE])


def test_a_failing_flag_is_retried_until_it_is_raised(capsys):
    """Raising the flag can fail on a loaded cluster (the flag actor's worker starts too slowly): the watcher tries
    again instead of waiting out the timeout with no stop on its way."""
    calls, failures = Calls(), [TimeoutError("slow"), TimeoutError("slow")]

    def flaky(name):
        if failures:
            raise failures.pop()
        calls.flag(name)

    with StopOnSigterm("run-e", timeout_s=60, raise_flag=flaky, exit_now=calls.exit):
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: calls.flags == ["run-e"], 30)
    err = capsys.readouterr().err
    assert err.count("could not raise the stop flag (TimeoutError: slow); retrying") == 2
    assert "stop flag raised" in err and calls.exits == []


def test_without_sigterm_nothing_happens():
    calls = Calls()
    with StopOnSigterm("run-c", timeout_s=0.1, raise_flag=calls.flag, exit_now=calls.exit) as stop:
        pass
    time.sleep(0.3)  # past the timeout: the watcher thread has ended without acting
    assert not stop.requested and calls.flags == calls.exits == []
    stop.raise_if_preempted(None, 10)


def test_a_cut_run_is_preempted_a_finished_one_is_not():
    stop = StopOnSigterm("run-d")
    stop.requested = True
    result = type("R", (), {"metrics": {"step": 7}, "checkpoint": type("C", (), {"path": "/ckpt/x"})()})()
    with pytest.raises(Preempted, match=r"preempted at step 7 .*/ckpt/x; re-run the same command"):
        stop.raise_if_preempted(result, max_steps=10)
    stop.raise_if_preempted(result, max_steps=7)  # reached max_steps anyway: published as usual


# ----------------------------------------------------------------------------------------------- real job
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "ab"))

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            time.sleep(0.3)
            return False

    if not wait_for(up, 90):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
    return proc


def job(out: Path, uri: str, log: Path, max_steps: int) -> subprocess.Popen:
    """The tiny default config, tracked by the MLflow server at `uri`; no periodic checkpoint before the end."""
    env = {**os.environ, "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train_mtn.py"), f"output_dir={out}",
                             f"mlflow_tracking_uri={uri}", f"max_steps={max_steps}", "log_every=1",
                             f"checkpoint_every={NEVER}", f"val_every={NEVER}", "compare_linear=false"],
                            cwd=out.parent, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


# run 1 cannot finish before its SIGTERM (once MLflow is down a step takes ~10 ms: a short run could end first);
# run 2 resumes with max_steps (a resumable key) set a few steps past the preempted one
NEVER = 1_000_000
MORE_STEPS = 20


def logged_steps(client) -> tuple[str | None, list[int]]:
    exp = client.get_experiment_by_name("mtn")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return None, []
    return runs[0].info.run_id, [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]


@pytest.mark.slow
def test_mlflow_server_killed_mid_run_then_sigterm_then_the_rerun_resumes_and_publishes(tmp_path):
    """Both faults on real processes, in one pair of job runs (each run costs ~35 s of start-up):
    run 1: a real `mlflow server` is SIGKILLed after a few steps are logged; training goes on (one warning); then
    SIGTERM to the driver: checkpoint at the next step boundary, exit 143. run 2, the same command (max_steps set a few
    steps past the stop) with the server still dead: resumes from that step (there is no other checkpoint), reaches max_steps, publishes the translator,
    and the failed MLflow upload prints its retry command; exit 0."""
    import mlflow

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    out, log1, log2 = tmp_path / "run", tmp_path / "first.log", tmp_path / "second.log"
    first = job(out, uri, log1, NEVER)
    try:
        client = mlflow.MlflowClient(uri)
        assert wait_for(lambda: len(logged_steps(client)[1]) >= 3 or first.poll() is not None, 240), \
            log1.read_text()[-3000:]
        run_id, steps = logged_steps(client)
        assert len(steps) >= 3, log1.read_text()[-3000:]
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server dies mid-run
        server.wait(timeout=30)
        assert wait_for(lambda: "is unreachable" in log1.read_text() or first.poll() is not None, 120)
        first.send_signal(signal.SIGTERM)  # to the driver process only, as `ray job stop` or the kubelet do
        rc = first.wait(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    text = log1.read_text()
    assert rc == EXIT_CODE, text[-4000:]
    stopped = re.search(r"preempted at step (\d+) \(SIGTERM\)", text)
    assert stopped and max(steps) < int(stopped.group(1)) < NEVER, text[-4000:]  # trained on after the kill
    assert "re-run the same command to resume" in text and not (out / "translator").exists()
    # the worker warns once per outage (Ray may relay a worker's line twice)
    warnings = {line[line.index("warning:"):] for line in text.splitlines() if "training goes on" in line}
    assert len(warnings) == 1 and f"MLflow at {uri} is unreachable" in warnings.pop(), text[-4000:]

    max_steps = int(stopped.group(1)) + MORE_STEPS
    second = job(out, uri, log2, max_steps)
    assert second.wait(timeout=300) == 0, log2.read_text()[-4000:]
    text = log2.read_text()
    assert f"resuming from the checkpoint at step {stopped.group(1)}" in text  # not step 0
    assert "== train_mtn finished ==" in text and re.search(r"missed \d+ metric points", text)
    assert "outputs ARE published" in text and f"--run-id {run_id}" in text  # the upload's retry command
    from mtn import load_translator

    assert load_translator(out / "translator").manifest["training"]["steps"] == max_steps


def test_a_raised_flag_stays_up_until_the_driver_drops_it(ray_cluster):
    """The real flag on a real Ray: a named actor that is not detached dies once no handle to it is left, so the
    driver keeps the handle; a worker polling seconds after the SIGTERM still sees the flag (it once vanished as soon
    as raise_flag returned, and a run trained on for minutes after 'stop flag raised')."""
    import gc

    with StopOnSigterm("flag-kept", timeout_s=60, exit_now=lambda code: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: stop.flag is not None, 60)
        gc.collect()
        time.sleep(2.0)  # well past the moment Ray destroyed the unreferenced actor
        assert StopSignal("flag-kept", poll_s=0).check()
        stop.flag = None  # the driver exits: the flag goes with it
    gc.collect()
    assert wait_for(lambda: not _flag_exists("flag-kept"), 30)


def _flag_exists(run_name: str) -> bool:
    import ray

    try:
        ray.get_actor(flag_name(run_name))
        return True
    except ValueError:
        return False
