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
    import torch

    from mtn import ModelTranslationNetwork
    from mtn.encoders import load_text_encoder
    from mtn.pipeline import build_tiny_sd_pipeline
    from mtn.translator import Translator

    root = tmp_path_factory.mktemp("serving")
    build_tiny_sd_pipeline(seed=0).save_pretrained(root / "tiny-sd")
    source = load_text_encoder("tiny:t5", max_length=16)
    torch.manual_seed(0)
    mtn = ModelTranslationNetwork(source_dim=source.hidden_size, target_dim=48, source_len=16, target_len=77,
                                  num_modules=1, hidden_dim=32)
    target_spec = {"name_or_path": "tiny:clip", "max_length": 77, "prefix": ""}
    Translator(source, mtn, {"target_encoder": target_spec}).save(root / "translator", bundle_source_encoder=True)
    return root / "tiny-sd", root / "translator"
