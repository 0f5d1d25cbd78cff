"""The HTTP layer without Ray (ASGI calls in-process): API keys, body limit, timeouts, error answers without
internals, request ids; the pixel budget, out-of-memory batches and the health probe of the generation core."""

import asyncio
import json
import logging

import numpy as np
import pytest
import torch

from mtn.errors import MTNError
from serve import LOGGER
from serve.api import GenerateRequest, RequestError, Service, Unavailable
from serve.app import raise_for_error
from serve.config import AppArgs, Auth
from serve.web import key_ok, load_api_keys, make_api

ARGS = {"pipeline": "unused", "translators": {"de": "/models/secret-de"},
        "limits": {"max_width": 256, "max_height": 256, "max_images": 4, "max_request_pixels": 3 * 64 * 64},
        "defaults": {"num_inference_steps": 2, "guidance_scale": 4.0, "width": 64, "height": 64},
        "admission": {"request_timeout_s": 0.2, "max_body_bytes": 2048, "retry_after_s": 3}}
GOOD = {"prompt": "ein roter Hund läuft am Strand", "seed": 1}


class Backend:
    """Answers, hangs (`hang`) or raises (`fail`) like the Generator's handle would."""

    def __init__(self, fail: Exception | None = None, hang: bool = False):
        self.fail, self.hang, self.cancelled = fail, hang, 0

    async def generate(self, route, request):
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail:
            raise self.fail
        return {"images": ["png"] * request["num_images"], "timings": {"generate_ms": 1.0},
                "batch": {"images": request["num_images"], "requests": 1}}


@pytest.fixture
def service_log(caplog):
    """caplog for the service's logger (a child of Ray Serve's, which does not propagate to the root)."""
    logger = logging.getLogger(LOGGER)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    yield caplog
    logger.removeHandler(caplog.handler)


def app_with(backend=None, keys=(), **over):
    args = AppArgs.model_validate({**ARGS, **over})
    return make_api(Service(args, backend or Backend()), keys)


def call(app, method="POST", path="/v1/generate", body=None, headers=(), chunks=None):
    """One HTTP request through the ASGI app -> (status, [(header, value)], parsed JSON or text)."""
    raw = json.dumps(body).encode() if body is not None else b""
    parts = chunks if chunks is not None else [raw]
    hdrs = [(k.lower().encode(), v.encode()) for k, v in headers]
    if method == "POST":
        hdrs.append((b"content-type", b"application/json"))
        if chunks is None:
            hdrs.append((b"content-length", str(len(raw)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": hdrs,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(m):
        sent.append(m)

    async def run():
        try:
            await app(scope, receive, send)
        except Exception:  # Starlette re-raises after its 500 answer has been sent
            pass

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    head = [(k.decode().lower(), v.decode()) for k, v in start["headers"]]
    ctype = dict(head).get("content-type", "")
    return start["status"], head, (json.loads(text) if ctype.startswith("application/json") else text)


def assert_plain_error(status, head, body, code):
    """A JSON error with a request id echoed in X-Request-ID, and nothing internal in it."""
    assert status == code, body
    assert set(body) == {"error", "detail", "request_id"} and body["error"], body
    assert [v for k, v in head if k == "x-request-id"] == [body["request_id"]]
    flat = json.dumps(body)
    for leak in ("Traceback", "/models/", "File \"", ".py", "pid=", "secret"):
        assert leak not in flat, (leak, flat)


def test_ok_answer_has_no_uris_and_a_request_id():
    status, head, body = call(app_with(), body=GOOD)
    assert status == 200 and body["route"]["route"] == "de" and "translator" not in body["route"]
    assert "/models/" not in json.dumps(body) and len(dict(head)["x-request-id"]) == 32
    # behind Ray's proxy the id arrives as a header: it is reused (and the proxy adds the response header)
    status, head, body = call(app_with(), body={"prompt": "ein Hund", "num_images": 99},
                              headers=[("X-Request-ID", "abc123")])
    assert status == 422 and body["request_id"] == "abc123" and "x-request-id" not in dict(head)


def test_every_generate_answer_is_recorded_with_its_route_language_and_status():
    seen = []
    args = AppArgs.model_validate({**ARGS, "translators": {"de": "/m/de", "multi": "/m/multi"}})
    app = make_api(Service(args, Backend()), load_api_keys(Auth(), {"MTN_API_KEYS": "k"}),
                   lambda *labels: seen.append(labels))
    key = [("Authorization", "Bearer k")]
    assert call(app, body=GOOD, headers=key)[0] == 200
    assert call(app, body={"prompt": "Eine Katze sitzt auf dem Tisch and a dog sleeps on the floor"},
                headers=key)[0] == 200
    assert call(app, body={**GOOD, "num_images": 99}, headers=key)[0] == 422  # refused before routing
    assert call(app, body=GOOD)[0] == 401
    assert call(app, "GET", "/healthz")[0] == 200 and call(app, "GET", "/v1/languages", headers=key)[0] == 200
    failing = make_api(Service(args, Backend(fail=Unavailable("at capacity"))), (), lambda *labels: seen.append(labels))
    assert call(failing, body=GOOD)[0] == 503
    assert seen == [("de", "de", 200), ("multi", "de", 200), ("none", "none", 422), ("none", "none", 401),
                    ("de", "de", 503)]


def test_api_keys_401_without_or_with_a_wrong_key_and_healthz_open(service_log):
    caplog = service_log
    app = app_with(keys=load_api_keys(Auth(), {"MTN_API_KEYS": " k-one ,k-two,"}))
    for headers in ([], [("Authorization", "Bearer nope")], [("Authorization", "k-one")],
                    [("Authorization", "Basic k-one")]):
        status, head, body = call(app, body=GOOD, headers=headers)
        assert_plain_error(status, head, body, 401)
        assert dict(head)["www-authenticate"] == "Bearer"
    assert call(app, "GET", "/v1/languages")[0] == 401
    for key in ("k-one", "k-two"):
        assert call(app, body=GOOD, headers=[("Authorization", f"Bearer {key}")])[0] == 200
        assert call(app, "GET", "/v1/languages", headers=[("Authorization", f"bearer {key}")])[0] == 200
    status, _, body = call(app, "GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    assert call(app, "GET", "/")[0] == 200  # the page (it sends the key it is given)
    assert "k-one" not in caplog.text and "k-two" not in caplog.text and "nope" not in caplog.text
    assert call(app_with(), body=GOOD)[0] == 200  # no keys configured: auth off


def test_load_api_keys_required_and_key_compare():
    assert load_api_keys(Auth(), {}) == ()
    assert load_api_keys(Auth(api_keys_env="K", required=True), {"K": "a,b"}) == (b"a", b"b")
    with pytest.raises(MTNError, match="auth.required is true but the environment variable K holds no API key"):
        load_api_keys(Auth(api_keys_env="K", required=True), {"K": " , "})
    assert key_ok("Bearer b", (b"a", b"b")) and not key_ok("Bearer c", (b"a", b"b")) and not key_ok(None, (b"a",))
    assert not key_ok("Bearer ", (b"a",)) and not key_ok("Bearer é", (b"a",))


def test_body_over_the_limit_is_413_declared_or_streamed():
    app = app_with()
    big = {**GOOD, "negative_prompt": "x" * 3000}
    assert_plain_error(*call(app, body=big), 413)
    # chunked (no Content-Length): counted while read, refused before the app sees it
    assert_plain_error(*call(app, chunks=[b'{"prompt": "', b"x" * 1500, b"y" * 1500, b'"}']), 413)
    assert call(app, chunks=[b'{"prompt": ', b'"ein Hund"}'])[0] == 200  # streamed and small: fine


def test_timeout_is_504_json_and_cancels_the_backend_call():
    backend = Backend(hang=True)
    status, head, body = call(app_with(backend), body=GOOD)
    assert_plain_error(status, head, body, 504)
    assert "longer than 0.2 s" in body["error"] and backend.cancelled == 1


@pytest.mark.parametrize("fail,code,retry", [
    (Unavailable("the service is at capacity; retry later", "BackPressureError(num_queued_requests=4 pid=7)"), 503,
     "3"),
    (MTNError("translator folder not found: /models/secret-de"), 503, "3"),
    (RuntimeError("boom in /srv/secret/file.py line 3"), 500, None)])
def test_backend_failures_are_plain_json(fail, code, retry, service_log):
    status, head, body = call(app_with(Backend(fail=fail)), body=GOOD)
    assert_plain_error(status, head, body, code)
    assert dict(head).get("retry-after") == retry
    assert body["request_id"] in service_log.text  # the details are in the log, under the request id


def test_pixel_budget_422_for_a_single_request():
    svc = Service(AppArgs.model_validate(ARGS), Backend())
    asyncio.run(svc.generate(GenerateRequest.model_validate({**GOOD, "num_images": 3})))  # exactly the budget
    with pytest.raises(RequestError, match="= 13824 pixels is above the budget of 12288") as e:
        asyncio.run(svc.generate(GenerateRequest.model_validate({**GOOD, "num_images": 3, "width": 72})))
    assert e.value.status == 422 and e.value.detail[0]["loc"] == ["body", "num_images"]
    with pytest.raises(ValueError, match="max_request_pixels=9000 is above batching.max_batch_pixels=8000"):
        AppArgs.model_validate({"pipeline": "p", "limits": {"max_request_pixels": 9000},
                                "batching": {"max_batch_pixels": 8000}})


# ------------------------------------------------------------------------------------------- generation core


@pytest.fixture(scope="module")
def core(tiny_serving):
    from serve.generator import GeneratorCore

    return GeneratorCore(AppArgs.model_validate({
        "pipeline": str(tiny_serving[0]), "device": "cpu", "translators": {"de": str(tiny_serving[1])},
        "limits": {"max_request_pixels": 2 * 32 * 32}, "batching": {"max_batch_pixels": 2 * 32 * 32}}))


def pixels(b64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.float64)


def req(seed, n=1, size=32):
    return {"prompt": f"ein Hund {seed}", "negative_prompt": "", "num_inference_steps": 2, "guidance_scale": 5.0,
            "width": size, "height": size, "seed": seed, "num_images": n}


def test_merged_batch_over_the_pixel_budget_is_split(core, monkeypatch):
    import serve.generator as gen

    calls = []
    real = gen.run_pipeline
    monkeypatch.setattr(gen, "run_pipeline", lambda pipe, pos, *a: calls.append(pos.shape[0]) or real(pipe, pos, *a))
    tr = core.load_translator("de")
    items = [(tr, req(1)), (tr, req(2, n=2)), (tr, req(3)), (tr, req(4))]  # 5 images of 32x32, budget 2
    out = core.run(items)
    assert calls == [1, 2, 2]  # [1] alone ([1]+[2] = 3 > 2), then [2], then [3]+[4]
    assert [o["batch_requests"] for o in out] == [1, 1, 2, 2] and [len(o["images"]) for o in out] == [1, 2, 1, 1]
    alone = core.run([items[3]])[0]  # same seed -> same image, whichever call it shared
    assert alone["batch_requests"] == 1 and np.abs(pixels(alone["images"][0]) - pixels(out[3]["images"][0])).max() <= 1


def test_out_of_memory_fails_only_that_batch_then_the_next_request_succeeds(core, monkeypatch):
    import serve.generator as gen

    real, boom = gen.run_pipeline, iter([True])

    def flaky(pipe, pos, *a):
        if next(boom, False):  # the first pipeline call only
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; pid 4242)")
        return real(pipe, pos, *a)

    monkeypatch.setattr(gen, "run_pipeline", flaky)
    tr = core.load_translator("de")
    out = core.run([(tr, req(1)), (tr, req(2)), (tr, req(3, size=64))])  # two calls: [1, 2] then [3]
    assert out[0] == out[1] == {"error": "out_of_memory"} and len(out[2]["images"]) == 1
    with pytest.raises(Unavailable, match="ran out of memory for this batch") as e:
        raise_for_error(out[0])
    assert "pid" not in e.value.reason and "GiB" not in e.value.reason
    assert len(core.run([(tr, req(4))])[0]["images"]) == 1  # the core (the replica) goes on


def test_health_probe_runs_the_pipeline_and_catches_a_stuck_call(core, monkeypatch):
    import time

    import serve.generator as gen

    core.check_health(max_busy_s=60)  # idle: a real one-step pipeline call
    monkeypatch.setattr(gen, "run_pipeline", lambda *a: [])
    with pytest.raises(RuntimeError, match="returned no image"):
        core.check_health(max_busy_s=60)
    with core._lock:  # a call is running: healthy while it is young, not once it has run past the bound
        core._busy_since = time.perf_counter()
        core.check_health(max_busy_s=60)
        core._busy_since = time.perf_counter() - 120
        with pytest.raises(RuntimeError, match="has run for over 60 s"):
            core.check_health(max_busy_s=60)
        core._busy_since = None
