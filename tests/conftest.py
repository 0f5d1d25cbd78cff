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
