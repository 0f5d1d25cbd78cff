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


class Batching(BaseModel):
    """`@serve.batch` settings: requests with the same size, steps, guidance and route share one forward."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10)


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
    # -- diffusers pipeline: local folder, hub id, or s3:// prefix holding a save_pretrained folder
    pipeline: str
    # -- language code (ISO 639-1, e.g. "de") or "multi" -> translator URI: folder, s3:// prefix or models:/name/version
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


SCHEDULERS = {"default", "ddim", "pndm", "dpm"}
