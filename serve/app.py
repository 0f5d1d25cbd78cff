"""Ray Serve application: FastAPI ingress -> Generator (pipeline, translators multiplexed per route, batching).

    serve run serve.app:build_app ...          # or: serve deploy serve/config.yaml ; or RayService (helm/)
    python -m serve                            # local default, tiny models, 127.0.0.1:8000

The Ingress checks keys, body size and limits, detects the language and picks a route; the call reaches a
Generator replica with `multiplexed_model_id=<route>`, so requests for a translator go to replicas that already
hold it (LRU, `max_translators_per_replica`). `@serve.batch` gathers concurrent requests; those that agree on
size, steps and guidance share denoising loops of at most `batching.max_batch_pixels`.

Overload: the Generator's queue at each Ingress is bounded (`admission.max_queued_requests`); one request more
raises Ray's BackPressureError at the Ingress's handle call, which answers its own JSON 503 + Retry-After at
once. /healthz and the page never touch the Generator, so they answer while it is saturated. Replicas, resources
and autoscaling are Serve deployment options (serve/config.yaml `deployments:`); the rest is the app's `args`.

Watching: the replicas record Prometheus metrics (serve/metrics.py: requests by route, language and status at the
Ingress; batch sizes, queue wait and generation time at the Generator), exported on each Ray node's metrics port;
they log under `ray.serve.mtn`, so Serve's `logging_config` (JSON in serve/config.yaml) applies and each record of a
request carries its request id.
"""

import asyncio
import logging
import time

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from mtn.errors import MTNError
from serve import LOGGER
from serve.api import Service, Unavailable
from serve.config import NATIVE, AppArgs
from serve.generator import GeneratorCore
from serve.metrics import GeneratorMetrics, IngressMetrics
from serve.web import load_api_keys, make_api

log = logging.getLogger(LOGGER)


@serve.deployment(name="Generator", max_ongoing_requests=16, ray_actor_options={"num_cpus": 1})
class Generator:
    def __init__(self, args: dict):
        self.args = AppArgs.model_validate(args)
        self.core = GeneratorCore(self.args)
        self.metrics = GeneratorMetrics()
        self._batched.set_max_batch_size(self.args.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batching.batch_wait_timeout_s)

        async def load_translator(route: str):
            return await asyncio.to_thread(self.core.load_translator, route)

        # a standalone function, wrapped here so the LRU size comes from config rather than the decorator
        self._translator = serve.multiplexed(max_num_models_per_replica=self.args.max_translators_per_replica)(
            load_translator)

    async def generate(self, request: dict, admitted_at: float | None = None) -> dict:
        """The images, or {"error": "unavailable" | "out_of_memory", "detail": for the log}: expected failures
        come back as values, so no remote traceback has to be taken apart at the Ingress.
        `admitted_at`: time.time() when the Ingress handed the request on (the queue-wait metric's start)."""
        route = serve.get_multiplexed_model_id() or NATIVE
        t0 = time.perf_counter()
        try:
            translator = await self._translator(route)  # cached per replica after the first request of a route
        except MTNError as e:
            log.error("route %s does not load: %s", route, e)
            return {"error": "unavailable", "detail": str(e)}
        out = await self._batched((translator, request, route, time.time() if admitted_at is None else admitted_at))
        if "error" in out:
            return {"error": out["error"], "detail": f"route {route}, {request['num_images']} x "
                                                      f"{request['width']}x{request['height']}"}
        return {"images": out["images"], "batch": {"images": out["batch_images"], "requests": out["batch_requests"]},
                "timings": {"encode_ms": out["encode_ms"], "generate_ms": out["generate_ms"],
                            "queue_ms": (time.perf_counter() - t0) * 1000 - out["encode_ms"] - out["generate_ms"]}}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple]) -> list[dict]:
        """items: (translator, request, route, admitted_at) of each request in the batch."""
        start = time.time()
        out = await asyncio.to_thread(self.core.run, [(translator, request) for translator, request, _, _ in items])
        self.metrics.batch([route for _, _, route, _ in items], [start - t for _, _, _, t in items],
                           sum(request["num_images"] for _, request, _, _ in items), time.time() - start)
        return out

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy (restarted)."""
        await asyncio.to_thread(self.core.check_health, 2 * self.args.admission.request_timeout_s)


class _HandleBackend:
    """serve.api.Backend over the Generator's handle: Ray's failures become `Unavailable` (plain reasons)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, route: str, request: dict) -> dict:
        response = self.handle.options(multiplexed_model_id=route).generate.remote(request, time.time())
        try:
            out = await response
        except asyncio.CancelledError:  # the Ingress's timeout: the Generator need not finish it
            response.cancel()
            raise
        except BackPressureError as e:
            raise Unavailable("the service is at capacity; retry after the Retry-After delay", str(e)) from None
        except (RayActorError, DeploymentUnavailableError) as e:
            raise Unavailable("the image generator is restarting; retry shortly", str(e).splitlines()[0]) from None
        return raise_for_error(out)


def raise_for_error(out: dict) -> dict:
    """A Generator answer -> itself, or `Unavailable` for its error values."""
    if out.get("error") == "out_of_memory":
        raise Unavailable("the generator ran out of memory for this batch; retry, or ask for fewer or smaller "
                          "images", out.get("detail", ""))
    if out.get("error") == "unavailable":
        raise MTNError(out.get("detail", "route unavailable"))
    return out


@serve.deployment(name="Ingress", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class Ingress:
    def __init__(self, generator: DeploymentHandle, args: dict):
        args = AppArgs.model_validate(args)
        self.api_keys = load_api_keys(args.auth)  # MTNError: the replica does not start, with that message
        log.info("API keys: %s", f"{len(self.api_keys)} configured" if self.api_keys else "off")
        self.service = Service(args, _HandleBackend(generator))
        self.metrics = IngressMetrics()
        _ = self.service.router.detector  # load the language models now, not on the first request

    async def __serve_build_asgi_app__(self):
        """Serve builds the ASGI app per replica after __init__: the routes close over this replica's config."""
        return make_api(self.service, self.api_keys, self.metrics.request)


def build_app(args: dict, generator_options: dict | None = None, ingress_options: dict | None = None
              ) -> serve.Application:
    """`import_path: serve.app:build_app`; `args` = serve.config.AppArgs (validated here, before any replica).
    `*_options`: extra Serve deployment options (tests); serve/config.yaml `deployments:` override both."""
    a = AppArgs.model_validate(args)
    cfg = a.model_dump()
    generator = Generator.options(max_queued_requests=a.admission.max_queued_requests, **(generator_options or {}))
    ingress = Ingress.options(max_queued_requests=a.admission.ingress_max_queued_requests,
                              backpressure_config={"retry_after_s": a.admission.retry_after_s},
                              **(ingress_options or {}))
    return ingress.bind(generator.bind(cfg), cfg)
