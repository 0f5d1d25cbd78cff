"""Ray Serve application: FastAPI ingress -> Generator (pipeline, translators multiplexed per route, batching).

    serve run serve.app:build_app ...          # or: serve deploy serve/config.yaml ; or RayService (helm/)
    python -m serve                            # local default, tiny models, 127.0.0.1:8000

The Ingress validates, detects the language and picks a route; the call reaches a Generator replica with
`multiplexed_model_id=<route>`, so requests for a translator go to replicas that already hold it (LRU,
`max_translators_per_replica`). `@serve.batch` gathers concurrent requests; those that agree on size, steps
and guidance share one denoising loop. Replicas, resources and autoscaling are Serve deployment options
(serve/config.yaml `deployments:`); everything else is the app's `args` (serve/config.py).
"""


import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.api import PAGE, GenerateRequest, GenerateResponse, RequestError, Service
from serve.config import NATIVE, AppArgs
from serve.generator import GeneratorCore

log = logging.getLogger("mtn.serve")
api = FastAPI(title="MTN multilingual text-to-image", version="0.1.0",
              description="Prompts in any routed language -> images from a diffusion model through MTN translators.")


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # the offending input is not echoed back: it may be megabytes, or not JSON-serialisable
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    msg = "; ".join(f"{'.'.join(str(p) for p in d['loc'][1:]) or 'body'}: {d['msg']}" for d in detail[:5])
    return JSONResponse({"error": f"invalid request: {msg}", "detail": detail}, status_code=422)


@api.exception_handler(RequestError)
async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(Exception)
async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the replica log"}, status_code=500)


@serve.deployment(name="Generator", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, args: dict):
        self.args = AppArgs.model_validate(args)
        self.core = GeneratorCore(self.args)
        self._batched.set_max_batch_size(self.args.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batching.batch_wait_timeout_s)

        async def load_translator(route: str):
            return await asyncio.to_thread(self.core.load_translator, route)

        # a standalone function, wrapped here so the LRU size comes from config rather than the decorator
        self._translator = serve.multiplexed(max_num_models_per_replica=self.args.max_translators_per_replica)(
            load_translator)

    async def generate(self, request: dict) -> dict:
        route = serve.get_multiplexed_model_id() or NATIVE
        t0 = time.perf_counter()
        translator = await self._translator(route)  # cached per replica after the first request of a route
        out = await self._batched((translator, request))
        return {"images": out["images"], "batch": {"images": out["batch_images"], "requests": out["batch_requests"]},
                "timings": {"encode_ms": out["encode_ms"], "generate_ms": out["generate_ms"],
                            "queue_ms": (time.perf_counter() - t0) * 1000 - out["encode_ms"] - out["generate_ms"]}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple]) -> list[dict]:
        return await asyncio.to_thread(self.core.run, items)


class _HandleBackend:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, route: str, request: dict) -> dict:
        return await self.handle.options(multiplexed_model_id=route).generate.remote(request)


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, args: dict):
        self.service = Service(AppArgs.model_validate(args), _HandleBackend(generator))
        _ = self.service.router.detector  # load the language models now, not on the first request

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses={422: {"description": "invalid request or unsupported language"},
                         503: {"description": "the route's translator cannot be loaded"}})
    async def generate(self, body: GenerateRequest) -> dict:
        return await self.service.generate(body)

    @api.get("/v1/languages")
    async def languages(self) -> dict:
        return self.service.languages()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE


def build_app(args: dict) -> serve.Application:
    """`import_path: serve.app:build_app`; `args` = serve.config.AppArgs (validated here, before any replica)."""
    cfg = AppArgs.model_validate(args).model_dump()
    return Ingress.bind(Generator.bind(cfg), cfg)
