import pytest


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
    from mtn.pipeline import build_tiny_sd_pipeline, build_tiny_translator

    root = tmp_path_factory.mktemp("serving")
    build_tiny_sd_pipeline(seed=0).save_pretrained(root / "tiny-sd")
    build_tiny_translator(seed=0).save(root / "translator", bundle_source_encoder=True)
    return root / "tiny-sd", root / "translator"
