"""Shared test fixtures, and the test session's environment.

TORCH_EXTENSIONS_DIR: DeepSpeed JIT-compiles its CPU ops (deepspeed_shm_comm, ~30-190 s on 2 cores) into
~/.cache/torch_extensions by default, one folder for every checkout on the machine. Two checkouts (two venvs, other
include paths) then rebuild it in turn, each build holding a lock the other's jobs wait on. One folder per venv
makes it one build per venv. Set here, it reaches job subprocesses and Ray workers (they inherit this environment).
"""

import atexit
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# One Ray temp dir per test process (per xdist worker, per run): a process that looks for "the" local cluster
# (address None/"auto": Ray Train's placement-group cleaner, the state API) reads <RAY_TMPDIR>/ray/ray_current_cluster,
# which otherwise names the cluster started last on the machine: the other xdist worker's, another checkout's test
# run, a developer's own Ray. Its controller is then "not found" and our placement group removed. Subprocess jobs and
# Ray's own processes inherit the variable; the folder goes when the process ends.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))[:8]
os.environ["RAY_TMPDIR"] = f"/tmp/ray-{_RUN}-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
atexit.register(shutil.rmtree, os.environ["RAY_TMPDIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored():
    """A test that points MLflow's process-wide tracking URI somewhere (mlflow.set_tracking_uri) must not send a
    later in-process job's calls there: the URI is reset after every test."""
    yield
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].tracking._tracking_service.utils._tracking_uri = None


@pytest.fixture(scope="session")
def _shared_ray():
    """The session's shared local Ray (see ray_cluster): {"up": whether this fixture's Ray is running}."""
    state = {"up": False}
    yield state
    if state["up"]:
        sys.modules["ray"].shutdown()


@pytest.fixture(scope="module", autouse=True)
def _shared_ray_only_where_asked(request, _shared_ray):
    """A module that does not use ray_cluster finds no Ray in this process, as if it ran alone: its own Ray (Serve
    tests) then gets the environment the module sets up (an API key variable, AWS endpoints)."""
    if _shared_ray["up"] and not any("ray_cluster" in item.fixturenames
                                     for item in request.session.items if item.module is request.module):
        sys.modules["ray"].shutdown()
        _shared_ray["up"] = False


@pytest.fixture(scope="module")
def ray_cluster(_shared_ray):
    """One local Ray shared by the consecutive test modules that ask for it (per xdist worker), for tests that run
    jobs in-process (`train_mtn.main([...])`, `fit`) or deploy Serve apps: mtn.train.cluster.ray_session joins a
    running Ray and leaves it running, so each such job saves a Ray start-up (~5-10 s on 2 cores). 4 logical CPUs:
    a 2-worker job (2 CPUs) beside a small Serve app; Ray oversubscribes the 2 cores rather than queueing. No GPU.

    Ray workers get the environment this process had when the cluster started, plus their runtime_env: a variable a
    test sets later (monkeypatch.setenv, s3_endpoint's AWS_ENDPOINT_URL, MLFLOW_TRACKING_URI) does not reach them.
    Tests whose workers need such a variable, need other cluster settings, or must own the process (SIGTERM,
    SIGKILL) keep their own Ray / subprocess."""
    pytest.importorskip("ray")
    from mtn.train.cluster import init_ray

    if not _shared_ray["up"]:
        saved = os.environ.pop("RAY_ADDRESS", None)  # a local cluster of the session's own, never a developer's
        try:
            # with its own dashboard: Ray Train's placement-group cleaner asks the dashboard (the address in the
            # cluster's KV) whether the run's controller lives; without one the KV still says 127.0.0.1:8265, which
            # on a shared machine may be ANOTHER cluster's dashboard (an xdist neighbour's job): "controller not
            # found" -> our placement group removed mid-run. With one, Ray binds a free port and records it.
            _shared_ray["up"] = init_ray(num_cpus=4, include_dashboard=True)
        finally:
            if saved is not None:
                os.environ["RAY_ADDRESS"] = saved


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A real S3 API on loopback (moto's server); the standard AWS settings point boto3/s3fs (and any subprocess
    or Ray worker started from here) at it. Yields the endpoint URL."""
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    # fsspec caches filesystem instances: one made for an earlier test's server (another port) must not be reused
    s3fs.S3FileSystem.clear_instance_cache()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        yield url
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def tiny_serving(tmp_path_factory):
    """Folders for serving tests: a tiny SD pipeline (text encoder = tiny:clip) and an untrained tiny translator
    (tiny:t5 bundled -> tiny:clip space), written exactly as users' folders are. Returns (pipeline, translator)."""
    from mtn.tiny.sd import build_tiny_sd_pipeline
    from mtn.tiny.translator import build_tiny_translator

    root = tmp_path_factory.mktemp("serving")
    build_tiny_sd_pipeline(seed=0).save_pretrained(root / "tiny-sd")
    build_tiny_translator(seed=0).save(root / "translator", bundle_source_encoder=True)
    return root / "tiny-sd", root / "translator"


def pytest_collection_modifyitems(config, items):
    """Test files run in this order: the multi-node one (its own 3-node cluster), those using ray_cluster (consecutive, so one Ray serves them all), then the
    other files holding slow tests, then the rest; collection order inside each part. Under xdist (`make test`:
    -n 2 --dist loadfile --no-loadscope-reorder) both workers so start on the long multi-process tests and the many
    short files fill the end, instead of one worker waiting on a last long file."""
    multinode = {item.path for item in items if item.get_closest_marker("multinode")}  # the longest file: first
    shared = {item.path for item in items if "ray_cluster" in item.fixturenames}
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in multinode, item.path not in shared, item.path not in slow))


@pytest.fixture
def mlflow_registry(tmp_path, monkeypatch):
    """An MLflow store in tmp_path, as the process-wide tracking URI (what models:/ URIs are resolved against);
    -> (client, experiment id). The previous tracking URI is restored afterwards."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    yield client, client.create_experiment("mtn", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(before)
