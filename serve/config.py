"""The serve application's arguments: `applications[].args` in serve/config.yaml, the Helm chart and RayService.

Everything the deployment needs comes from here (model and translator URIs, limits, batching), so one
`serve build`-style YAML, the chart's `serveConfigV2` and `python -m serve` all describe the same app.
Replicas, resources and autoscaling are Ray Serve's own deployment options, set next to these args.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

NATIVE = "native"  # route name: the pipeline's own text encoder (its tokenizer + text_encoder)


class Limits(BaseModel):
    """What one request may ask for; violations are 422s, never a replica crash."""

    model_config = ConfigDict(extra="forbid")
    max_prompt_chars: int = Field(500, ge=1, le=10000)
    max_width: int = Field(768, ge=8, le=4096)
    max_height: int = Field(768, ge=8, le=4096)
    max_steps: int = Field(100, ge=1, le=1000)
    max_images: int = Field(4, ge=1, le=64)
    max_guidance_scale: float = Field(30.0, gt=0, le=100)
    # -- width x height x num_images of one request; above it the request is a 422 (it could never run)
    max_request_pixels: int = Field(4 * 512 * 512, ge=64, le=2**31)


class Batching(BaseModel):
    """`@serve.batch` settings: requests with the same size, steps, guidance and route share one forward."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)
    # -- sum of width x height x num_images over one pipeline call: a merged batch above it is split into
    #    several calls (never run whole); >= limits.max_request_pixels so any admitted request fits alone
    max_batch_pixels: int = Field(8 * 512 * 512, ge=64, le=2**31)


class Admission(BaseModel):
    """Load shedding: what the service admits, and how long an admitted request may take."""

    model_config = ConfigDict(extra="forbid")
    # -- requests waiting for a Generator slot at each Ingress replica (Ray Serve `max_queued_requests` of the
    #    Generator deployment); one more is answered at once with a JSON 503 + Retry-After. A replica holds
    #    `max_ongoing_requests` (deployment option) more, so a service admits replicas x ongoing + this.
    max_queued_requests: int = Field(16, ge=1, le=10000)
    # -- the Ingress's own bound (requests waiting at the HTTP proxy for an Ingress slot); the proxy answers
    #    them with Ray's plain-text 503 + Retry-After, so keep it well above max_queued_requests
    ingress_max_queued_requests: int = Field(256, ge=1, le=100000)
    # -- seconds an admitted request may wait + run before a JSON 504; set http_options.request_timeout_s
    #    above it (the proxy's own timeout answers a plain 408)
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    # -- the Retry-After header (seconds) of 503 answers
    retry_after_s: int = Field(1, ge=0, le=3600)
    # -- largest request body accepted; larger ones are a JSON 413 (read no further)
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)


class Auth(BaseModel):
    """Optional API keys: `Authorization: Bearer <key>` on /v1/*; /healthz, the page and /docs stay open."""

    model_config = ConfigDict(extra="forbid")
    # -- environment variable holding the accepted keys, comma-separated (the chart fills it from a Secret);
    #    unset or empty -> auth is off
    api_keys_env: str = Field("MTN_API_KEYS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # -- true: an empty/unset variable is a start-up error instead of "auth off"
    required: bool = False


class Defaults(BaseModel):
    """Values for the optional request fields."""

    model_config = ConfigDict(extra="forbid")
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)


class AppArgs(BaseModel):
    """`args` of the `mtn` application (see serve/config.yaml for a commented example)."""

    model_config = ConfigDict(extra="forbid")
    # -- diffusers pipeline: local folder, hub id org/name[@revision], or s3:// prefix holding a save_pretrained folder
    pipeline: str
    # -- language code (ISO 639-1, e.g. "de") or "multi" -> translator URI: folder, s3:// prefix, models:/name/version,
    #    models:/name@alias (e.g. @champion: resolved to its version before caching), runs:/<run>/translator or a
    #    hub id org/name[@revision]
    translators: dict[str, str] = Field(default_factory=dict)
    # -- route for English prompts: "native" (the pipeline's own text encoder) or a key of `translators`
    english_route: str = NATIVE
    # -- route for prompts mixing languages: a key of `translators`; null -> "multi" when configured, else 422
    hybrid_route: str | None = None
    # -- route for a detected language without its own translator; null -> 422 "unsupported language"
    fallback_route: str | None = None
    # -- scheduler: ddim | pndm | dpm (DPM-Solver++ multistep) | default (the pipeline's own)
    scheduler: str = "default"
    # -- "auto" takes cuda when present
    device: str = "auto"
    # -- float16 | bfloat16 | float32 (float32 on CPU whatever this says)
    dtype: str = "float16"
    # -- translators kept in memory per replica (least recently used ones are dropped)
    max_translators_per_replica: int = Field(4, ge=1, le=64)
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    defaults: Defaults = Field(default_factory=Defaults)
    admission: Admission = Field(default_factory=Admission)
    auth: Auth = Field(default_factory=Auth)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {v!r}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {v!r}")
        return v

    def model_post_init(self, _context) -> None:
        for name, route in (("english_route", self.english_route), ("hybrid_route", self.hybrid_route),
                            ("fallback_route", self.fallback_route)):
            if route is not None and route != NATIVE and route not in self.translators:
                raise ValueError(f"{name}={route!r} is neither 'native' nor a key of translators "
                                 f"({sorted(self.translators)})")
        if self.limits.max_request_pixels > self.batching.max_batch_pixels:
            raise ValueError(f"limits.max_request_pixels={self.limits.max_request_pixels} is above "
                             f"batching.max_batch_pixels={self.batching.max_batch_pixels}: such a request could never run")


SCHEDULERS = {"default", "ddim", "pndm", "dpm"}


def load_app_args(path: str | None = None, overrides: list[str] | None = None, default: dict | None = None) -> dict:
    """The `mtn` app's args through the jobs' loader (mtn.config): the first application's args of a serve-build
    YAML (serve/config.yaml, the chart's serveConfigV2) or `default`, then `key=value` overrides (dotted for nested
    ones: limits.max_width=256) and ${ENV:-default}; checked against AppArgs here, before any replica starts.
    Any error is one MTNError line (unknown keys with a did-you-mean hint)."""
    from mtn.config import apply_overrides, expand_env, read_yaml, validate
    from mtn.errors import MTNError

    raw = default or {}
    if path is not None:
        try:
            raw = read_yaml(path)["applications"][0]["args"]
        except (MTNError, KeyError, IndexError, TypeError) as e:
            raise MTNError(f"{path} is not a serve config with applications[0].args ({type(e).__name__}: {e})") \
                from None
    args = expand_env(apply_overrides(raw, overrides))
    try:
        validate(AppArgs, args)
    except MTNError as e:
        raise MTNError(f"invalid app args: {e}") from None
    return args
