"""The service logic without Ray: validation, limits, routing, error mapping; model URIs."""

import asyncio
import base64
import io

import numpy as np
import pytest
from pydantic import ValidationError

from mtn.errors import MTNError
from mtn.uris import fetch_folder
from serve.api import GenerateRequest, RequestError, Service
from serve.config import AppArgs


class FakeBackend:
    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = [], fail

    async def generate(self, route, request):
        if self.fail:
            raise self.fail
        self.calls.append((route, request))
        return {"images": ["png"] * request["num_images"], "timings": {"generate_ms": 1.0},
                "batch": {"images": request["num_images"], "requests": 1}}


ARGS = {"pipeline": "unused", "translators": {"de": "/models/de", "multi": "/models/multi"},
        "limits": {"max_width": 256, "max_height": 128, "max_steps": 20, "max_images": 2, "max_prompt_chars": 80,
                   "max_guidance_scale": 15},
        "defaults": {"num_inference_steps": 5, "guidance_scale": 4.0, "width": 64, "height": 64}}


@pytest.fixture(scope="module")
def service():
    return Service(AppArgs.model_validate(ARGS), FakeBackend())


def call(service, **body):
    return asyncio.run(service.generate(GenerateRequest.model_validate(body)))


def test_defaults_route_and_response(service):
    out = call(service, prompt="ein roter Hund läuft am Strand", seed=5)
    route, req = service.backend.calls[-1]
    assert route == "de" and out["route"]["route"] == "de" and out["route"]["language"] == "de"
    assert "translator" not in out["route"] and "/models/" not in repr(out)  # no URIs in answers
    assert req == {"prompt": "ein roter Hund läuft am Strand", "negative_prompt": "", "num_inference_steps": 5,
                   "guidance_scale": 4.0, "width": 64, "height": 64, "seed": 5, "num_images": 1}
    assert out["seed"] == 5 and set(out["timings"]) >= {"route_ms", "generate_ms", "total_ms"}
    assert call(service, prompt="A photo of an astronaut riding a horse")["route"]["route"] == "native"
    # no `hybrid_route` configured: "multi" is used because it exists
    assert call(service, prompt="Eine Katze sitzt auf dem Tisch and a dog sleeps on the floor")["route"]["route"] == "multi"


def test_random_seed_when_absent(service):
    assert call(service, prompt="ein Hund")["seed"] != call(service, prompt="ein Hund")["seed"]


@pytest.mark.parametrize("body,field", [
    ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 81}, "prompt"), ({"prompt": "x", "negative_prompt": "y" * 81},
                                                                       "negative_prompt"),
    ({"prompt": "x", "width": 60}, "width"), ({"prompt": "x", "width": 264}, "width"),
    ({"prompt": "x", "height": 136}, "height"), ({"prompt": "x", "num_inference_steps": 21}, "num_inference_steps"),
    ({"prompt": "x", "num_images": 3}, "num_images"), ({"prompt": "x", "guidance_scale": 15.5}, "guidance_scale")])
def test_limits_are_422_naming_the_field(service, body, field):
    with pytest.raises(RequestError) as e:
        call(service, **body)
    assert e.value.status == 422 and e.value.detail[0]["loc"] == ["body", field], e.value.body()


@pytest.mark.parametrize("body", [{}, {"prompt": 3}, {"prompt": "x", "steps": 3}, {"prompt": "x", "width": "64"},
                                  {"prompt": "x", "width": 64.0}, {"prompt": "x", "guidance_scale": float("nan")},
                                  {"prompt": "x", "seed": -1}, {"prompt": "x", "num_images": 0},
                                  {"prompt": "x", "num_images": True}, {"prompt": "x", "language": "german"}])
def test_schema_rejects_bad_types(body):
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body)


def test_unsupported_language_and_unavailable_route():
    svc = Service(AppArgs.model_validate({"pipeline": "p", "translators": {"de": "/x"}}), FakeBackend())
    with pytest.raises(RequestError, match="'ru' has no translator") as e:
        call(svc, prompt="Пушистый кот спит на подоконнике")
    assert e.value.status == 422
    broken = Service(svc.args, FakeBackend(fail=MTNError("translator folder not found: /x")), svc.router)
    with pytest.raises(RequestError, match="route 'de' is unavailable; see the service log") as e:
        call(broken, prompt="ein roter Hund läuft am Strand")
    assert e.value.status == 503 and "/x" not in e.value.message and e.value.headers() == {"Retry-After": "1"}


def test_languages_listing(service):
    out = service.languages()
    assert out["routes"] == {"de": "de", "en": "native"} and out["hybrid_route"] == "multi"
    assert out["translators"] == ["de", "multi"]  # route names, not their URIs
    assert {"de", "en", "zh", "ja"} <= set(out["detected_languages"])


@pytest.mark.parametrize("args,msg", [({"pipeline": "p", "english_route": "en"}, "english_route='en' is neither"),
                                      ({"pipeline": "p", "scheduler": "euler"}, "scheduler must be one of"),
                                      ({"pipeline": "p", "limits": {"max_steps": 0}}, "greater than or equal to 1"),
                                      ({"pipeline": "p", "replicas": 2}, "Extra inputs are not permitted")])
def test_app_args_validation(args, msg):
    with pytest.raises(ValidationError, match=msg):
        AppArgs.model_validate(args)


# ------------------------------------------------------------------------------------------- model URIs


def test_fetch_local_folder(tiny_serving, tmp_path):
    assert fetch_folder(str(tiny_serving[1]), "translator.json") == tiny_serving[1]
    with pytest.raises(MTNError, match="model folder not found"):
        fetch_folder(str(tmp_path / "nope"), "translator.json")
    with pytest.raises(MTNError, match="holds no translator.json"):
        fetch_folder(str(tmp_path), "translator.json")


def test_fetch_from_s3(s3_endpoint, tiny_serving, tmp_path):
    import boto3
    import s3fs

    boto3.client("s3").create_bucket(Bucket="models")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(tiny_serving[1]), "models/translators/de", recursive=True)
    local = fetch_folder("s3://models/translators/de", "translator.json", cache_dir=tmp_path)
    from mtn.translator import load_translator

    assert load_translator(local).encode(["ein Hund"]).shape == (1, 77, 48)
    assert fetch_folder("s3://models/translators/de", "translator.json", cache_dir=tmp_path) == local  # cached
    with pytest.raises(MTNError, match="nothing found under s3://models/missing"):
        fetch_folder("s3://models/missing", "translator.json", cache_dir=tmp_path)


def test_fetch_from_mlflow_run(tiny_serving, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("serve-test", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(tiny_serving[1]), "translator")
    local = fetch_folder(f"runs:/{run.info.run_id}/translator", "translator.json", cache_dir=tmp_path / "cache")
    assert (local / "mtn" / "config.json").is_file()
    with pytest.raises(MTNError, match="cannot download runs:/0000"):
        fetch_folder("runs:/0000/translator", "translator.json", cache_dir=tmp_path / "cache")


def test_registry_uris_are_cached_per_store_and_only_when_complete(tiny_serving, tmp_path, monkeypatch):
    """models:/m/1 of one MLflow store is not models:/m/1 of another; a version whose folder lacks the marker is
    refused every time, never cached as if it were complete."""
    import mlflow
    from mlflow_store import register_plain_folder as register_folder  # the layout older than logged models

    folders = []
    for store, logged in (("a", tiny_serving[1]), ("b", tiny_serving[1] / "mtn")):  # b: no translator.json
        uri = f"sqlite:///{tmp_path}/{store}.db"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("e", artifact_location=str(tmp_path / f"artifacts-{store}"))
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(logged), "translator")
        assert register_folder(mlflow.MlflowClient(), "m", run.info.run_id, "translator") == "models:/m/1"
        if store == "a":
            folders.append(fetch_folder("models:/m/1", "translator.json", cache_dir=tmp_path / "cache"))
    for _ in range(2):
        with pytest.raises(MTNError, match="holds no translator.json"):
            fetch_folder("models:/m/1", "translator.json", cache_dir=tmp_path / "cache")
    assert (folders[0] / "translator.json").is_file()
    assert len([p for p in (tmp_path / "cache").iterdir() if (p / ".complete").is_file()]) == 1


# ------------------------------------------------------------------------------------------- generation core


def test_generator_core_groups_compatible_requests_and_is_batch_invariant(tiny_serving):
    from serve.generator import GeneratorCore

    core = GeneratorCore(AppArgs.model_validate({"pipeline": str(tiny_serving[0]), "device": "cpu",
                                                 "translators": {"de": str(tiny_serving[1])}}))
    tr = core.load_translator("de")
    assert core.load_translator("native") is None

    def req(seed, size=32, n=1):
        return {"prompt": f"ein Hund {seed}", "negative_prompt": "", "num_inference_steps": 2, "guidance_scale": 5.0,
                "width": size, "height": size, "seed": seed, "num_images": n}

    items = [(tr, req(1, n=2)), (None, req(2)), (tr, req(3, size=48)), (tr, req(4))]
    out = core.run(items)
    assert [o["batch_requests"] for o in out] == [3, 3, 1, 3] and out[0]["batch_images"] == 4
    assert [len(o["images"]) for o in out] == [2, 1, 1, 1]
    alone = [core.run([it])[0] for it in items]
    for a, o in zip(alone, out, strict=True):  # batching changes no image (beyond float reassociation)
        for x, y in zip(a["images"], o["images"], strict=True):
            assert np.abs(pixels(x) - pixels(y)).max() <= 1
    with pytest.raises(MTNError, match="no translator configured for route 'fr'"):
        core.load_translator("fr")


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64)
