"""HTTP API: request/response models, validation against the configured limits, routing, error bodies.

`Service` is plain Python (no Ray): the HTTP layer (serve/web.py) delegates every route to it, and tests drive
it directly. `backend.generate(route, request) -> dict` does the GPU work; it raises `Unavailable` when the
request cannot be served now (full queue, out of memory, a route that does not load).

Answers carry a plain reason and the request id, never a URI, a path or a traceback: those go to the log,
under the same request id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from mtn.errors import MTNError
from serve import LOGGER
from serve.config import AppArgs
from serve.routing import LanguageRouter, UnsupportedLanguage

log = logging.getLogger(LOGGER)
UNROUTED = "none"  # route and language labels of a request that was not routed
PAGE = (Path(__file__).parent / "page.html").read_text()
MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """Argument names follow diffusers. Types are strict ("5" is not 5); unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"prompt": "ein roter Hund läuft am Strand", "seed": 0}]})
    prompt: str = Field(description="text in any routed language (limit: limits.max_prompt_chars)")
    negative_prompt: str = Field("", description="encoded on the same route as the prompt; '' = unconditional")
    num_inference_steps: int | None = Field(None, ge=1, description="default from config; <= limits.max_steps")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="<= limits.max_guidance_scale")
    width: int | None = Field(None, ge=8, description="multiple of 8, <= limits.max_width")
    height: int | None = Field(None, ge=8, description="multiple of 8, <= limits.max_height")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image k uses seed + k; random when absent")
    num_images: int = Field(1, ge=1, description="<= limits.max_images")
    language: str | None = Field(None, pattern=r"^(auto|[a-z]{2})$",
                                 description="ISO 639-1 code to skip detection, or 'auto' (default)")


class RouteInfo(BaseModel):
    route: str  # "native" or a key of `translators` (never the translator's URI)
    language: str | None
    languages: list[str]
    hybrid: bool
    confidence: float
    reason: str


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNG images")
    route: RouteInfo
    seed: int
    timings: dict[str, float]
    batch: dict[str, int] = Field(description="images and requests in the pipeline call that made these images")


class RequestError(Exception):
    """An error answer: JSON {"error": message, "detail": [...], "request_id": ...} (+ Retry-After on 503s)."""

    def __init__(self, status: int, message: str, detail: list[dict] | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.detail, self.retry_after_s = status, message, detail or [], retry_after_s

    def body(self, request_id: str | None = None) -> dict:
        return {"error": self.message, "detail": self.detail, **({"request_id": request_id} if request_id else {})}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class Unavailable(Exception):
    """Raised by a backend: the request cannot be served now. `reason` is for the client (no internals),
    `detail` for the log only."""

    def __init__(self, reason: str, detail: str = "", retry: bool = True):
        super().__init__(reason)
        self.reason, self.detail, self.retry = reason, detail, retry


class Backend(Protocol):
    async def generate(self, route: str, request: dict) -> dict: ...


class Service:
    def __init__(self, args: AppArgs, backend: Backend, router: LanguageRouter | None = None):
        self.args = args
        self.backend = backend
        self.router = router or make_router(args)

    def check(self, req: GenerateRequest) -> dict:
        """The request with defaults filled in; RequestError(422) listing every violated limit."""
        lim, d = self.args.limits, self.args.defaults
        r = req.model_dump()
        for key in ("num_inference_steps", "guidance_scale", "width", "height"):
            if r[key] is None:
                r[key] = getattr(d, key)
        errors = []

        def bad(field: str, msg: str) -> None:
            errors.append({"loc": ["body", field], "msg": msg, "type": "limit"})

        if not r["prompt"].strip():
            bad("prompt", "prompt is empty")
        if len(r["prompt"]) > lim.max_prompt_chars:
            bad("prompt", f"prompt has {len(r['prompt'])} characters; the limit is {lim.max_prompt_chars}")
        if len(r["negative_prompt"]) > lim.max_prompt_chars:
            bad("negative_prompt", f"negative_prompt is over {lim.max_prompt_chars} characters")
        for key, top in (("width", lim.max_width), ("height", lim.max_height)):
            if r[key] % 8:
                bad(key, f"{key} must be a multiple of 8 (the VAE downsamples by 8), got {r[key]}")
            if r[key] > top:
                bad(key, f"{key} {r[key]} is above the limit of {top}")
        if r["num_inference_steps"] > lim.max_steps:
            bad("num_inference_steps", f"num_inference_steps {r['num_inference_steps']} is above {lim.max_steps}")
        if r["num_images"] > lim.max_images:
            bad("num_images", f"num_images {r['num_images']} is above {lim.max_images}")
        if r["guidance_scale"] > lim.max_guidance_scale:
            bad("guidance_scale", f"guidance_scale {r['guidance_scale']} is above {lim.max_guidance_scale}")
        pixels = r["width"] * r["height"] * r["num_images"]
        if pixels > lim.max_request_pixels:
            bad("num_images", f"width x height x num_images = {pixels} pixels is above the budget of "
                              f"{lim.max_request_pixels}; ask for fewer or smaller images")
        if errors:
            raise RequestError(422, "; ".join(e["msg"] for e in errors), errors)
        if r["seed"] is None:
            r["seed"] = random.randrange(0, MAX_SEED - lim.max_images)
        r["seed"] = min(r["seed"], MAX_SEED - r["num_images"])
        return r

    async def generate(self, req: GenerateRequest, request_id: str = "-", labels: dict | None = None) -> dict:
        """`labels` (optional) gets the metrics' "route" and "language" as soon as the route is chosen, so a
        request that fails afterwards is counted under them too."""
        t0 = time.perf_counter()
        r = self.check(req)
        try:
            decision = await asyncio.to_thread(self.router.route, r["prompt"], r["language"])
        except UnsupportedLanguage as e:
            raise RequestError(422, str(e)) from None
        if labels is not None:
            labels["route"] = decision.route
            labels["language"] = decision.language or UNROUTED  # a hybrid prompt: its main language
        t1 = time.perf_counter()
        payload = {k: r[k] for k in ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width",
                                     "height", "seed", "num_images")}
        adm = self.args.admission
        try:
            out = await asyncio.wait_for(self.backend.generate(decision.route, payload), adm.request_timeout_s)
        except TimeoutError:
            log.warning("request %s timed out after %.1f s (route %s)", request_id, adm.request_timeout_s,
                        decision.route)
            raise RequestError(504, f"the request took longer than {adm.request_timeout_s:g} s; "
                                    "try again later or ask for fewer steps or images") from None
        except Unavailable as e:
            log.warning("request %s unavailable (route %s): %s %s", request_id, decision.route, e.reason, e.detail)
            raise RequestError(503, e.reason, retry_after_s=adm.retry_after_s if e.retry else None) from None
        except MTNError as e:  # a translator/pipeline that does not load: the deployment's fault, not the user's
            log.error("request %s: route %s failed: %s", request_id, decision.route, e)
            raise RequestError(503, f"route {decision.route!r} is unavailable; see the service log "
                                    f"(request id {request_id})", retry_after_s=adm.retry_after_s) from None
        timings = {"route_ms": (t1 - t0) * 1000, **out.get("timings", {}),
                   "total_ms": (time.perf_counter() - t0) * 1000}
        log.info("request %s: route %s (%s), %d image(s) in %.0f ms", request_id, decision.route, decision.reason,
                 r["num_images"], timings["total_ms"])
        return {"images": out["images"], "seed": r["seed"], "timings": timings, "batch": out.get("batch", {}),
                "route": decision.to_dict()}

    def languages(self) -> dict[str, Any]:
        routes = {code: self.router.route_for_language(code) for code in self.router.supported() if code != "*"}
        return {"routes": routes, "translators": sorted(self.args.translators), "english_route": self.args.english_route,
                "hybrid_route": self.router.hybrid_route, "fallback_route": self.args.fallback_route,
                "detected_languages": sorted(_code(lang) for lang in self.router._languages)}


def make_router(args: AppArgs) -> LanguageRouter:
    translated = {k: k for k in args.translators if len(k) == 2}  # "de" -> the "de" translator
    hybrid = args.hybrid_route or ("multi" if "multi" in args.translators else None)
    return LanguageRouter(translated, english_route=args.english_route, hybrid_route=hybrid,
                          fallback_route=args.fallback_route)


def _code(language) -> str:
    return language.iso_code_639_1.name.lower()
