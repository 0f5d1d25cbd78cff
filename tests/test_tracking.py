"""MLflow off the critical path: bounded retries, one warning per outage, buffered metrics, the driver's upload
and its retry command. A real `mlflow server` killed in the middle of a training run: tests/test_preemption.py
(one pair of job runs covers both faults)."""

import os
import shlex
import socket
import time
from dataclasses import dataclass, field

import pytest

from mtn.train.guard import QUICK_HTTP, quick_http_env, redact
from mtn.train.tracking import RunTracker, main, upload_outputs


@pytest.fixture(autouse=True)
def _quick_http(monkeypatch):
    """RunTracker sets these in its process: set (and undo) them here so that they do not leak into other tests."""
    for k, v in QUICK_HTTP.items():
        monkeypatch.setenv(k, v)


@dataclass
class Cfg:
    mlflow_tracking_uri: str = "http://user:secret@127.0.0.1:1"
    mlflow_experiment: str = "mtn"
    output_dir: str = "/tmp/unused"
    name: str = "run"
    lr: float = 0.1

    def to_dict(self):
        return {"lr": self.lr, "name": self.name}


@dataclass
class FakeClient:
    """An MlflowClient stand-in whose server can be 'down' (every call fails like a refused connection)."""
    down: bool = False
    calls: int = 0
    runs: int = 0
    batches: list = field(default_factory=list)  # (kind, [entities])
    reject_next: bool = False

    def _hit(self):
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")
        if self.reject_next:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            self.reject_next = False
            raise MlflowException("bad value", INVALID_PARAMETER_VALUE)

    def get_experiment_by_name(self, name):
        self._hit()
        return type("E", (), {"experiment_id": "1"})()

    def create_run(self, exp_id, run_name=None, tags=None):
        self._hit()
        self.runs += 1
        return type("R", (), {"info": type("I", (), {"run_id": f"run{self.runs}"})()})()

    def log_batch(self, run_id, metrics=(), params=()):
        self._hit()
        self.batches.append(("metrics", list(metrics)) if metrics else ("params", list(params)))

    def update_run(self, run_id, status):
        self._hit()

    def log_inputs(self, run_id, datasets=()):
        self._hit()
        self.batches.append(("inputs", list(datasets)))

    def set_terminated(self, run_id, status):
        self._hit()

    def sent_steps(self):
        return [m.step for kind, ms in self.batches if kind == "metrics" for m in ms]


class Clock:
    def __init__(self):
        self.t, self.slept = 0.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.slept.append(s)
        self.t += s


def tracker(client, clock, logs, cfg=None, system_metrics_s=None, **kw):
    """System metrics off unless asked for: a test takes samples by calling `t.sampler.sample()`."""
    return RunTracker(cfg or Cfg(), client=client, clock=clock, sleep=clock.sleep, log=logs.append,
                      system_metrics_s=system_metrics_s, **kw)


def test_outage_costs_bounded_retries_one_warning_and_buffered_points_are_flushed():
    client, clock, logs = FakeClient(), Clock(), []
    t = tracker(client, clock, logs)
    assert t.run_id == "run1" and client.batches[0][0] == "params"
    t.log_metrics({"step": 1, "train/loss": 1.0}, 1)
    client.down = True
    before = client.calls
    t.log_metrics({"train/loss": 0.9, "val/r@1": 0.5}, 2)  # the outage starts: 3 tries, backoff 0.5 s then 1 s
    assert client.calls - before == 3 and clock.slept == [0.5, 1.0]
    for step in range(3, 20):  # between probes nothing touches the network
        clock.t += 0.1
        t.log_metrics({"train/loss": 1.0 / step}, step)
    assert client.calls - before == 3
    clock.t += 5  # a probe (a single try) finds it still down: the probe interval doubles
    t.log_metrics({"train/loss": 0.01}, 20)
    assert client.calls - before == 4 and t.guard.next_probe == pytest.approx(clock.t + 10)
    client.down = False
    clock.t += 10
    t.log_metrics({"train/loss": 0.005}, 21)
    assert [line for line in logs if "unreachable" in line] == logs[:1] and len(logs) == 2  # warned once, back once
    assert "***@127.0.0.1" in logs[0] and "secret" not in logs[0]
    assert client.sent_steps() == [1, 2, 2, *range(3, 22)]  # in order, none lost
    assert "val/r_at_1" in {m.key for _, ms in client.batches for m in ms}
    assert t.close() == {"metric_points_dropped": 0, "calls_skipped": 0}


def test_full_buffer_drops_the_oldest_and_counts_them(capsys):
    client, clock, logs = FakeClient(), Clock(), []
    t = tracker(client, clock, logs, max_buffer=4)
    client.down = True
    for step in range(1, 4):
        t.log_metrics({"a": step, "b": step}, step)  # 6 points, room for 4
    assert t.dropped == 2 and [m.step for m in t.pending] == [2, 2, 3, 3]
    lost = t.close("KILLED")  # the last forced flush fails too: the queued points are reported as missed
    assert lost == {"metric_points_dropped": 6, "calls_skipped": 0}
    assert "missed 6 metric points" in capsys.readouterr().err


def test_refused_call_is_not_an_outage():
    client, clock, logs = FakeClient(), Clock(), []
    t = tracker(client, clock, logs)
    client.reject_next = True
    t.log_metrics({"x": 1.0}, 1)  # refused (4xx): dropped, warned, no retries, not "down"
    t.log_metrics({"x": 2.0}, 2)
    assert t.guard.down_since is None and clock.slept == [] and t.dropped == 1
    assert client.sent_steps() == [2] and "refused" in logs[0]


def test_server_down_at_start_creates_the_run_when_it_is_back():
    client, clock, logs = FakeClient(down=True), Clock(), []
    t = tracker(client, clock, logs)
    assert t.run_id is None
    t.log_metrics({"x": 1.0}, 1)
    client.down, clock.t = False, clock.t + 60
    t.log_metrics({"x": 2.0}, 2)
    assert t.run_id == "run1" and client.sent_steps() == [1, 2]
    assert [kind for kind, _ in client.batches] == ["params", "metrics"]


def test_quick_http_settings_do_not_override_the_users(monkeypatch):
    for k in QUICK_HTTP:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    quick_http_env()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0  # the name MLflow reads
    assert redact("https://u:p@host:5000/x") == "https://***@host:5000/x"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failed_upload_prints_a_retry_command_that_works(tmp_path, capsys, monkeypatch):
    import mlflow

    from mtn.tiny.translator import build_tiny_translator

    out = tmp_path / "out"
    build_tiny_translator(seed=0).save(out / "translator")  # its source LM (tiny:t5) is built from a config
    (out / "metrics.json").write_text("{}")
    arts, model = {"metrics.json": str(out / "metrics.json")}, {"translator": str(out / "translator")}
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    assert upload_outputs(dead, "abc", arts, model, "m", attempts=2, backoff_s=0.1) is None
    assert time.monotonic() - t0 < 30  # seconds, not MLflow's minutes of retries
    err = capsys.readouterr().err
    assert "outputs ARE published" in err
    cmd = shlex.split(err.strip().splitlines()[-1])
    assert cmd[1:4] == ["-m", "mtn.train.tracking", "upload"] and cmd[cmd.index("--tracking-uri") + 1] == dead
    assert cmd[cmd.index("--model") + 1] == f"translator={out / 'translator'}" and cmd[cmd.index("--register") + 1] == "m"

    # the same command against a store that works (the server is back): uploads, logs the translator as the
    # run's MLflow model, registers that, ends the run
    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(store)
    exp = client.create_experiment("mtn", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    cmd[cmd.index("--tracking-uri") + 1], cmd[cmd.index("--run-id") + 1] = store, run_id
    assert main(cmd[3:]) == 0
    assert {a.path for a in client.list_artifacts(run_id)} == {"metrics.json"}
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mtn.registered_model"] == "models:/m/1"
    (logged,) = client.search_logged_models([exp])
    assert logged.name == "translator" and logged.source_run_id == run_id
    assert client.get_model_version("m", "1").source == f"models:/{logged.model_id}"
    assert main(["upload", "--tracking-uri", store, "--register", "m"]) == 2  # nothing to register: usage error


def test_system_metrics_wait_with_the_training_metrics_while_the_server_is_down():
    client, clock, logs = FakeClient(), Clock(), []
    t = tracker(client, clock, logs, system_metrics_s=3600)  # the thread never fires: samples taken by hand
    client.down = True
    t.log_metrics({"train/loss": 1.0}, 7)
    assert t.sampler.sample() and t.sampler.sample()
    t.log_metrics({"train/loss": 0.5}, 8)  # between probes: queued, nothing raised, nothing blocked
    system = [m for m in t.pending if m.key.startswith("system/")]
    assert {m.key for m in system} >= {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
    assert {m.step for m in system} == {7} and len(system) == 2 * len({m.key for m in system})
    client.down, clock.t = False, clock.t + 60
    t.log_metrics({"train/loss": 0.25}, 9)
    assert not t.pending and "system/cpu_utilization_percentage" in {
        m.key for kind, ms in client.batches if kind == "metrics" for m in ms}
    t.close()
    assert not t.sampler._thread.is_alive()


@dataclass
class DataCfg(Cfg):
    corpus: str = ""
    feature_cache: str | None = None


def test_a_new_run_says_which_job_made_it_and_what_it_trained_on(tmp_path):
    """Source tags (not Ray's default_worker.py), the training data as an mlflow.data input, system metrics."""
    import mlflow

    corpus = tmp_path / "captions.txt"
    corpus.write_text("ein Hund\na red dog\n")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = DataCfg(mlflow_tracking_uri=store, output_dir=str(tmp_path), corpus=str(corpus))
    t = RunTracker(cfg, job="finetune_unet", system_metrics_s=3600)
    assert t.sampler.sample()
    t.log_metrics({"train/loss": 1.0}, 1)
    t.close("FINISHED")
    run = mlflow.MlflowClient(store).get_run(t.run_id)
    assert run.data.tags["mlflow.source.name"] == "jobs/finetune_unet.py"
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mtn.job"] == "finetune_unet"
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "captions.txt" and used.dataset.source_type == "local"
    assert str(corpus) in used.dataset.source and [(x.key, x.value) for x in used.tags] == [
        ("mlflow.data.context", "training")]
    assert "system/system_memory_usage_megabytes" in run.data.metrics and run.data.metrics["train/loss"] == 1.0
    # the digest follows the data: same files -> same digest, a changed file -> another one
    from mtn.train.run_metadata import data_fields, fingerprint

    assert fingerprint(data_fields(cfg)) == used.dataset.digest
    corpus.write_text("ein Hund\n")
    assert fingerprint(data_fields(cfg)) != used.dataset.digest
    generated = DataCfg(corpus="generated:200")
    from mtn.train.run_metadata import training_input

    assert training_input(generated).dataset.source_type == "code"
    assert training_input(Cfg()) is None  # a config naming no data: no input logged
