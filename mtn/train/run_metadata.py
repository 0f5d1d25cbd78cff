"""What a training run tells MLflow besides its metrics: the job that made it, the data it trained on, and the
machine's load (MLflow system metrics).

- `source_tags`: `mlflow.source.name` = the job script (not Ray's `default_worker.py`, which MLflow would record
  for a run created in a Ray worker), `mlflow.source.type` = JOB.
- `training_input`: the training data as an MLflow dataset input (`mlflow.data` MetaDataset: source = the feature
  cache / corpus / shards, digest = a cheap fingerprint of them) in the run's "Datasets used".
- `SystemSampler`: MLflow's own system monitors (CPU, memory, disk, network; GPU when pynvml finds one), sampled
  on a daemon thread that never touches the network. The samples are sent by `RunTracker` with the training
  metrics, through its guard: MLflow's `SystemMetricsMonitor` publishes from its thread without one (it stops
  for good at the first failed call and its `finish()` can wait on a dead server).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections import deque
from pathlib import Path

SOURCE_TYPE = "JOB"
SYSTEM_METRICS_S = 30.0  # seconds between samples (MLflow's default is 10; a training run lasts hours)
# the config fields naming the training data, most specific first: the first one set is the dataset's source
DATA_FIELDS = ("feature_cache", "precomputed", "corpus", "train_shards", "source_file", "target_file")


def source_tags(job: str) -> dict[str, str]:
    """The tags that say which job made a run."""
    return {"mlflow.source.name": f"jobs/{job}.py", "mlflow.source.type": SOURCE_TYPE, "mtn.job": job,
            "mtn.host": os.uname().nodename}


def data_fields(cfg) -> dict[str, str]:
    return {k: str(getattr(cfg, k)) for k in DATA_FIELDS if getattr(cfg, k, None)}


def training_input(cfg):
    """The run's training data as an MLflow DatasetInput (context "training"), or None when the config names
    none."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    fields = data_fields(cfg)
    if not fields:
        return None
    primary = next(iter(fields.values()))
    dataset = MetaDataset(source=_source(primary, fields), name=_name(primary), digest=fingerprint(fields))
    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def _source(primary: str, fields: dict[str, str]):
    if primary.startswith("generated:"):  # template captions made by code: no file to point at
        from mlflow.data.code_dataset_source import CodeDatasetSource

        return CodeDatasetSource({f"mtn.data.{k}": v for k, v in fields.items()})
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": the local and the file:// resolver
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(primary)


def _name(primary: str) -> str:
    return primary.replace(":", "-") if primary.startswith("generated:") else Path(primary.rstrip("/")).name


def fingerprint(fields: dict[str, str]) -> str:
    """A digest that changes when the data does, cheap to compute: the fields, plus for local data each file's
    size and mtime, or a folder's manifest.json (feature caches, shards) else its listing. Remote data is
    fingerprinted by its URI only."""
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for value in fields.values():
        p = Path(value).expanduser()
        if "://" in value or not p.exists():
            continue
        if p.is_file():
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        elif (p / "manifest.json").is_file():
            h.update((p / "manifest.json").read_bytes())
        else:
            h.update(json.dumps(sorted((q.name, q.stat().st_size) for q in p.iterdir() if q.is_file())).encode())
    return h.hexdigest()[:16]


def _monitors() -> list:
    """MLflow's system monitors (what `SystemMetricsMonitor` uses), GPU ones where a driver answers."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        monitors.append(GPUMonitor())
    except Exception:  # noqa: BLE001 - no NVIDIA GPU / pynvml here: CPU-side metrics only
        pass
    return monitors


class SystemSampler:
    """System metrics every `interval_s`, kept (bounded) until `drain()`; `stop()` ends the thread. Collecting
    never raises into training: a monitor that fails is reported once and sampling stops."""

    def __init__(self, interval_s: float = SYSTEM_METRICS_S, max_samples: int = 10_000, log=None):
        self.monitors = _monitors()
        self.interval_s, self.log = interval_s, log
        self.samples: deque = deque(maxlen=max_samples)  # (time ms, {"system/...": value}); appends are atomic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtn-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and self.sample():
            pass

    def sample(self) -> bool:
        """Take one sample into the queue; False (after one warning) when a monitor fails."""
        try:
            values = {}
            for m in self.monitors:
                m.collect_metrics()
                values.update(m.aggregate_metrics())
                m.clear_metrics()
        except Exception as e:  # noqa: BLE001 - a broken monitor (e.g. a GPU driver) must not stop training
            if self.log:
                self.log(f"warning: system metrics stopped ({type(e).__name__}: {e})")
            return False
        self.samples.append((int(time.time() * 1000), {f"system/{k}": float(v) for k, v in values.items()}))
        return True

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        out = []
        while self.samples:
            out.append(self.samples.popleft())
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
