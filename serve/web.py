"""The HTTP layer: a FastAPI app per Ingress replica, built from its config (no module-level state).

    make_api(service, api_keys, record) -> FastAPI

Outside in, every request passes: a request id (the `x-request-id` that Ray's proxy sets, or a new one; errors
carry it in their body and the log lines of the request name it), API keys on /v1/* (401), the body size limit
(413, the body is read no further), then the routes. Every error answer is JSON {"error", "detail",
"request_id"}: no traceback, path or URI ever reaches a client. Each /v1/generate answer, errors included, is
counted by route, routed language and status (`record`, serve.metrics).

The service logs under `ray.serve.mtn`, a child of Ray Serve's logger: in a replica its records take Serve's
`logging_config` (JSON encoding) and carry the request's id (the X-Request-ID of the answer) as `request_id`.
"""

from __future__ import annotations

import hmac
import logging
import os
import uuid
from collections.abc import Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from mtn.errors import MTNError
from serve import LOGGER
from serve.api import PAGE, UNROUTED, GenerateRequest, GenerateResponse, RequestError, Service
from serve.config import Auth

log = logging.getLogger(LOGGER)
REQUEST_ID = "x-request-id"
PROTECTED_PREFIX = "/v1/"  # needs a key when keys are configured; /healthz, /, /docs, /openapi.json stay open
GENERATE_PATH = "/v1/generate"
CLIENT_GONE = 499  # status recorded when the client left before an answer (nginx's code for it)
Recorder = Callable[[str, str, int], None]  # (route, language, status) of one /v1/generate answer


def load_api_keys(auth: Auth, environ: Mapping[str, str] = os.environ) -> tuple[bytes, ...]:
    """The accepted keys from the variable `auth.api_keys_env` (comma-separated); () = auth off.
    MTNError when `auth.required` and there are none. The keys themselves are never logged."""
    keys = tuple(k.strip().encode() for k in environ.get(auth.api_keys_env, "").split(",") if k.strip())
    if auth.required and not keys:
        raise MTNError(f"auth.required is true but the environment variable {auth.api_keys_env} holds no API key "
                       "(comma-separated keys; the Helm chart fills it from a Secret)")
    return keys


def key_ok(header: str | None, keys: tuple[bytes, ...]) -> bool:
    """`Authorization: Bearer <key>` against every key, each in constant time (no early exit either)."""
    if not header or not header[:7].lower() == "bearer ":
        return False
    given = header[7:].strip().encode()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, k)
    return ok


def error(status: int, message: str, request_id: str, headers: dict[str, str] | None = None,
          detail: list | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail or [], "request_id": request_id}, status_code=status,
                        headers=headers)


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or request.headers.get(REQUEST_ID) or "-"


class Guard:
    """ASGI middleware: request id, API keys, body size, and the last word on unexpected errors (a JSON 500).
    Outside the routes, so 401/413/500 carry the request id too, and `record` sees every answer's status."""

    def __init__(self, app, api_keys: tuple[bytes, ...], max_body_bytes: int, record: Recorder | None = None):
        self.app, self.keys, self.max_body, self.record = app, api_keys, max_body_bytes, record

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.record is None or scope["path"] != GENERATE_PATH:
            return await self._guard(scope, receive, send)
        status = CLIENT_GONE

        async def watched(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            return await self._guard(scope, receive, watched)
        finally:  # the route handler puts the routing decision into the request's state (Service.generate)
            state = scope.get("state", {})
            self.record(state.get("route", UNROUTED), state.get("language", UNROUTED), status)

    async def _guard(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        rid = headers.get(REQUEST_ID)
        if rid is None:  # not behind Ray's proxy (which sets it and adds the response header itself)
            rid = uuid.uuid4().hex
            send = _with_header(send, "X-Request-ID", rid)
        rid = rid[:64]
        scope.setdefault("state", {})["request_id"] = rid
        if self.keys and scope["path"].startswith(PROTECTED_PREFIX) and not key_ok(headers.get("authorization"),
                                                                                    self.keys):
            log.info("request %s: 401 on %s (missing or unknown API key)", rid, scope["path"])
            return await error(401, "missing or invalid API key (Authorization: Bearer <key>)", rid,
                               {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(scope, receive, send, rid)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, more = b"", True
            while more:  # at most max_body + one chunk in memory, whatever the client declared
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return None
                body += msg.get("body", b"")
                more = msg.get("more_body", False)
                if len(body) > self.max_body:
                    return await self._too_large(scope, receive, send, rid)
            receive = _replay(body, receive)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            return await self.app(scope, receive, tracked)
        except Exception:  # anything the routes did not turn into an answer: logged here, a plain 500 there
            log.exception("request %s: unhandled error", rid)
            if started:
                raise
            return await error(500, "internal error; the service log has the details under this request id",
                               rid)(scope, receive, send)

    async def _too_large(self, scope, receive, send, rid: str):
        log.info("request %s: 413 (body over %d bytes)", rid, self.max_body)
        return await error(413, f"request body is over {self.max_body} bytes", rid)(scope, receive, send)


def _with_header(send, name: str, value: str):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name.lower().encode(), value.encode())]}
        await send(message)
    return wrapped


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: wait for the disconnect as the server would
    return replayed


def make_api(service: Service, api_keys: tuple[bytes, ...] = (), record: Recorder | None = None) -> FastAPI:
    """The service's routes over `service`; `api_keys` from load_api_keys (empty: no auth); `record` counts the
    /v1/generate answers (serve.metrics.IngressMetrics.request in a replica; None: not counted)."""
    api = FastAPI(title="MTN multilingual text-to-image", version="0.2.0",
                  description="Prompts in any routed language -> images from a diffusion model through MTN "
                              "translators. With API keys configured, /v1/* needs `Authorization: Bearer <key>`.")
    api.add_middleware(Guard, api_keys=api_keys, max_body_bytes=service.args.admission.max_body_bytes, record=record)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the offending input is not echoed back: it may be megabytes, or not JSON-serialisable
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        msg = "; ".join(f"{'.'.join(str(p) for p in d['loc'][1:]) or 'body'}: {d['msg']}" for d in detail[:5])
        return error(422, f"invalid request: {msg}", request_id_of(request), detail=detail)

    @api.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(request_id_of(request)), status_code=exc.status, headers=exc.headers())

    @api.post(GENERATE_PATH, response_model=GenerateResponse,
              responses={401: {"description": "API keys are configured and this request has none that matches"},
                         413: {"description": "request body over admission.max_body_bytes"},
                         422: {"description": "invalid request, over a limit or the pixel budget, or unsupported "
                                              "language"},
                         503: {"description": "at capacity, out of memory, or the route cannot load (Retry-After)"},
                         504: {"description": "not done within admission.request_timeout_s"}})
    async def generate(body: GenerateRequest, request: Request) -> dict:
        return await service.generate(body, request_id_of(request), labels=request.scope.setdefault("state", {}))

    @api.get("/v1/languages")
    async def languages() -> dict:
        return service.languages()

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    return api
