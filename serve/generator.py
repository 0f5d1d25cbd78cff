"""The generation core, free of Ray: one pipeline, translators per route, batches of compatible requests.

A batch of requests is encoded with one text-encoder call per route, then requests that agree on size,
steps, guidance and sequence length run as ONE pipeline call. Each image has its own generator seeded from the
request, so an image is the same whether it ran alone or in a batch of 8.

A pipeline call holds at most `batching.max_batch_pixels` (width x height x images): a larger group of
compatible requests is split into several calls. An out-of-memory error fails only the requests of the call
that raised it (their result is {"error": "out_of_memory"}); the replica frees the cache and goes on.

Models: `pipeline` and every translator URI go through mtn.uris.fetch_folder, so each may be a folder, s3://,
models:/ or runs:/ (downloaded once per node into the MTN cache), or a Hugging Face hub id org/name[@revision]
(read from the HF cache, HF_HOME; a node that must not reach the hub sets HF_HUB_OFFLINE=1 and a pre-populated
cache). A translator loads its source encoder by the id its translator.json records, from the same HF cache.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass

import torch

from mtn.errors import MTNError
from mtn.pipeline import check_translator, load_pipeline, run_pipeline, text_embeddings
from mtn.translator import load_translator
from mtn.uris import fetch_folder
from serve import LOGGER
from serve.config import NATIVE, AppArgs

log = logging.getLogger(LOGGER)
PROBE_SIZE = 64  # px: the health probe's image (8x8 latents), one step


@dataclass
class Job:
    prompt_embeds: torch.Tensor  # [n, S_t, d_t], one row per image
    negative_prompt_embeds: torch.Tensor  # [n, S_t, d_t]
    seeds: list[int]  # n
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a pipeline call."""
        return (self.width, self.height, self.num_inference_steps, float(self.guidance_scale),
                tuple(self.prompt_embeds.shape[1:]))

    @property
    def pixels(self) -> int:
        return self.width * self.height * len(self.seeds)


def split_by_pixels(idx: list[int], jobs: list[Job], budget: int) -> list[list[int]]:
    """Consecutive chunks of `idx` whose jobs hold <= budget pixels together (a job alone may exceed it:
    the Ingress refuses such requests, and the core still runs one alone rather than drop it)."""
    chunks: list[list[int]] = []
    used = budget + 1
    for i in idx:
        if used + jobs[i].pixels > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += jobs[i].pixels
    return chunks


def is_oom(e: BaseException) -> bool:
    """CUDA (torch.OutOfMemoryError) or a CPU allocator's failure to allocate."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and (
        "out of memory" in str(e) or "can't allocate memory" in str(e).lower()))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class GeneratorCore:
    def __init__(self, args: AppArgs, cache_dir: str | None = None):
        self.args = args
        self.cache_dir = cache_dir
        self.device = resolve_device(args.device)
        # half precision is for accelerators; on CPU it is slower and some kernels lack fp16
        self.dtype = getattr(torch, args.dtype) if self.device.type != "cpu" else torch.float32
        self.pipe = load_pipeline(str(fetch_folder(args.pipeline, "model_index.json", cache_dir)), self.device,
                                  self.dtype, args.scheduler)
        # a pipeline call keeps per-call state (scheduler timesteps, PNDM history, guidance): one call at a time
        self._lock = threading.Lock()
        self._busy_since: float | None = None  # perf_counter() when the running pipeline call began

    def load_translator(self, route: str):
        """None for the native route; else the translator behind `route` (raises MTNError when unusable)."""
        if route == NATIVE:
            return None
        if route not in self.args.translators:
            raise MTNError(f"no translator configured for route {route!r}")
        path = fetch_folder(self.args.translators[route], "translator.json", self.cache_dir)
        tr = load_translator(path, device=self.device, dtype=self.dtype)
        try:  # its declared text space against the UNet's width and the tokenizer's length, at load time
            check_translator(self.pipe, tr)
        except MTNError as e:
            raise MTNError(f"translator {route!r}: {e}") from None
        return tr

    def make_jobs(self, items: list[tuple[object, dict]]) -> list[Job]:
        """Embeddings for validated request dicts, one text-encoder call per distinct translator.
        items: (translator or None, request with prompt, negative_prompt, seed, num_images, ...)."""
        jobs: list[Job | None] = [None] * len(items)
        by_route: dict[int, list[int]] = {}
        for i, (translator, _) in enumerate(items):
            by_route.setdefault(id(translator), []).append(i)
        for idx in by_route.values():
            translator, reqs = items[idx[0]][0], [items[i][1] for i in idx]
            with self._lock if translator is None else _NO_LOCK:  # native: the pipeline's own text encoder
                pos, neg = text_embeddings(self.pipe, translator, [r["prompt"] for r in reqs],
                                           [r["negative_prompt"] for r in reqs])  # [b, S_t, d_t] each
            for k, (i, r) in enumerate(zip(idx, reqs, strict=True)):
                n = r["num_images"]
                jobs[i] = Job(pos[k:k + 1].repeat_interleave(n, 0), neg[k:k + 1].repeat_interleave(n, 0),  # [n, S, d]
                              [r["seed"] + j for j in range(n)], r["num_inference_steps"], r["guidance_scale"],
                              r["width"], r["height"])
        return jobs

    def run(self, items: list[tuple[object, dict]]) -> list[dict]:
        """One result per (translator, request): {"images": [base64 PNG], "batch_images", "batch_requests",
        "encode_ms", "generate_ms"}, or {"error": "out_of_memory"} for the requests of a call that ran out of
        memory. Requests that agree on Job.key share pipeline calls of <= batching.max_batch_pixels."""
        t = time.perf_counter()
        jobs = self._unless_oom(self.make_jobs, items, len(items))
        if jobs is None:
            return [{"error": "out_of_memory"} for _ in items]
        encode_ms = (time.perf_counter() - t) * 1000
        results: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        for same_key in groups.values():
            for idx in split_by_pixels(same_key, jobs, self.args.batching.max_batch_pixels):
                group = [jobs[i] for i in idx]
                t = time.perf_counter()
                images = self._unless_oom(self._pipeline_call, group, len(idx))
                if images is None:
                    for i in idx:
                        results[i] = {"error": "out_of_memory"}
                    continue
                ms = (time.perf_counter() - t) * 1000
                start = 0
                for i, job in zip(idx, group, strict=True):
                    n = len(job.seeds)
                    results[i] = {"images": [png_base64(im) for im in images[start:start + n]],
                                  "encode_ms": encode_ms, "batch_images": len(images),
                                  "batch_requests": len(group), "generate_ms": ms}
                    start += n
        return results

    def _pipeline_call(self, group: list[Job]) -> list:
        with self._lock, torch.inference_mode():
            self._busy_since = time.perf_counter()
            try:
                return run_pipeline(
                    self.pipe, torch.cat([j.prompt_embeds for j in group]),  # [sum n, S_t, d_t]
                    torch.cat([j.negative_prompt_embeds for j in group]), [s for j in group for s in j.seeds],
                    group[0].num_inference_steps, group[0].guidance_scale, group[0].width, group[0].height)
            finally:
                self._busy_since = None

    def _unless_oom(self, step, arg, n: int):
        """step(arg) -> its result, or None when it ran out of memory (then the cache is freed and the caller fails
        the n requests it served); any other error propagates."""
        try:
            return step(arg)
        except Exception as e:
            if not is_oom(e):
                raise
            log.error("out of memory in a batch of %d requests; failing them and freeing the cache: %s", n,
                      str(e).splitlines()[0] if str(e) else type(e).__name__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    def check_health(self, max_busy_s: float) -> None:
        """Raises when the pipeline does not answer: a one-step probe image when idle; when a call is running,
        only that it has run for less than max_busy_s (a probe would wait for the lock)."""
        if not self._lock.acquire(blocking=False):
            since = self._busy_since
            if since is not None and time.perf_counter() - since > max_busy_s:
                raise RuntimeError(f"a pipeline call has run for over {max_busy_s:.0f} s")
            return
        try:
            with torch.inference_mode():
                pos, neg = text_embeddings(self.pipe, None, [""], [""])  # [1, 77, d] each
                images = run_pipeline(self.pipe, pos, neg, [0], 1, 1.0, PROBE_SIZE, PROBE_SIZE)
        finally:
            self._lock.release()
        if len(images) != 1 or images[0].size != (PROBE_SIZE, PROBE_SIZE):
            raise RuntimeError("the health probe's pipeline call returned no image")


_NO_LOCK = contextlib.nullcontext()


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
