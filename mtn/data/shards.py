"""Streaming img2dataset-style webdataset shards (`NNNNN.tar` of `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`)
from S3 (s3fs; endpoint and keys from the standard AWS_* settings, so MinIO works) or local disk, for UNet
finetuning. Reader: plain sequential tar parsing over an fsspec stream + a read-ahead thread per sub-stream.

Why not Ray Data (read_webdataset + ray.train.get_dataset_shard): open-source Ray has no exact mid-epoch resume
(ray-project/ray#37633 is still open; Anyscale's "mid-epoch resumption" is a RayTurbo-only feature), its
streaming order is not reproducible by default, a corrupt image or a cut tar fails the read/map task instead of
being counted, and it was ~3x slower here. `python bench/streaming.py --repeat 2` (40 shards x 100 jpgs of 512 px =
223 MB, moto S3 on loopback, 2 CPU cores shared with other jobs, 256 px, batch 32; ranges over 4 runs, load
1-3), samples/s (first batch): boto3 GET 3700-10000 (200-620 MB/s) | this reader, no decode 4100-5900
(230-330 MB/s) | make_loader workers=0 660-780 (0.3-0.5 s), workers=2 710-770 (0.7-0.9 s) |
Ray Data 200-270 (3.8-6.2 s). Decode+resize is the bound (~1.4 ms/image with DCT-scaled JPEG decode,
`jpeg_draft`, vs ~5 ms without); 2 cores also run moto and the main process, so workers=2 gains little here
(local files: 860-990 vs 510-580 with one worker). Budget about one loader worker per 500 images/s.

Order. The epoch's shard list is shuffled by (seed, epoch) and dealt to ranks (`shards[rank::world]`), then to
`lanes` sub-streams per rank (default: one per DataLoader worker). Each lane reads its shards in order through
a shuffle buffer seeded by (seed, epoch, rank, lane) and cuts full batches; lane batch r of lane l sits at
canonical position "round r, then lane order" (lanes that ran out drop out of later rounds). With fewer shards
than ranks (or than lanes) the split is by sample index inside each shard instead: every sample still goes to
exactly one (rank, lane), at the price of each reader scanning (not decoding) the others' samples.

Resume. `skip_batches=k` (batches this rank consumed in this epoch) is exact: a lane first replays its first
ceil((k - lane) / lanes) batches, which were certainly consumed, checking images (decode) but without resize,
crop or transfer; ShardLoader re-merges the lanes in canonical order in the main process (the DataLoader's
worker round-robin plays no part) and drops the few remaining consumed batches that exist only when some lane
ran out before position k. Same shards, seed, epoch, world size, lanes (num_workers) and batch size required.

Stats. Each batch from make_loader carries "stats": counts since the previous batch, summed over all loader
workers (the last batch also carries the counts that came after it), so the sum of batch["stats"] over an
epoch is the epoch's total; `loader.totals` holds the same running sum. Keys: STAT_KEYS. `ShardStream.stats()`
counts only what ran in the calling process (num_workers=0 or direct iteration). Failed or truncated shards are
skipped and counted, but once a lane has lost more than `max_skipped_shard_fraction` of its shards the stream
raises MTNError (in the main process, also from loader workers): an S3 outage fails the run, not its data.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtn.data.imageproc import decode_image, image_size, train_transform
from mtn.data.lanes import lower_bound, merge_lanes
from mtn.data.shardio import ShardReader, expand_braces, list_shards
from mtn.data.tinyshards import write_tiny_shards
from mtn.errors import MTNError

__all__ = ["STAT_KEYS", "ShardLoader", "ShardStream", "StreamConfig", "expand_braces", "list_shards", "make_loader",
           "write_tiny_shards"]

log = logging.getLogger("mtn.data")

STAT_KEYS = ("samples", "skipped_corrupt", "skipped_no_caption", "skipped_filtered", "truncated_shards",
             "failed_shards", "resume_skipped", "dropped_tail")
_WARN_LIMIT = 20  # per-sample warnings per kind and process; later ones go to DEBUG (the counts stay exact)


@dataclass
class StreamConfig:
    resolution: int = 256
    center_crop: bool = True
    random_flip: bool = False
    shuffle_buffer: int = 1000  # samples (raw bytes, ~50 KB each for LAION jpgs) per lane
    seed: int = 0
    min_caption_chars: int = 1
    max_caption_chars: int = 1000
    min_image_size: int = 0  # shorter side of the original image (json original_width/height, else the header)
    image_exts: tuple = ("jpg", "jpeg", "png", "webp")
    caption_ext: str = "txt"
    lanes: int = 0  # sub-streams per rank; 0 = one per DataLoader worker. Fix it to resume with other num_workers
    prefetch_samples: int = 256  # raw samples each lane's reader thread reads ahead
    read_block_size: int = 8 << 20  # bytes per ranged GET on S3
    open_retries: int = 2  # transient errors opening a shard (missing/forbidden ones fail at once)
    jpeg_draft: bool = True  # decode JPEGs at the smallest DCT scale still >= resolution (2-5x faster)
    # shards a lane may lose (unreadable, or cut short: an S3 outage, a broken upload) before the run fails rather
    # than train on less data than planned; a fraction of the lane's shards (1.0: never fail, only count)
    max_skipped_shard_fraction: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.max_skipped_shard_fraction <= 1.0:
            raise MTNError(f"max_skipped_shard_fraction must be in [0, 1], got {self.max_skipped_shard_fraction}")


@dataclass
class _Raw:
    shard: str
    key: str
    image: bytes
    caption: str


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).split(' <_io.')[0]}"  # PIL's messages end with the BytesIO repr


def _meta_size(data: bytes | None) -> tuple[int, int] | None:
    try:
        meta = json.loads(data) if data else None
        w = meta.get("original_width") or meta.get("width")
        h = meta.get("original_height") or meta.get("height")
        return (int(w), int(h)) if w and h else None
    except (ValueError, TypeError, AttributeError):
        return None


class ShardStream(IterableDataset):
    """Samples {"pixel_values": float32 [3, R, R] in [-1, 1], "caption", "key", "shard"} of this rank's share of
    one epoch (see the module docstring for order, resume and splitting). Iterated directly (or by a DataLoader
    with num_workers <= 1) it yields every sample, full batches in canonical order then the lanes' partial
    tails; use make_loader() for batches, exact resume with workers, and stats in the main process."""

    def __init__(self, shards: list[str], cfg: StreamConfig | None = None, rank: int = 0, world_size: int = 1,
                 epoch: int = 0, skip_batches: int = 0, batch_size: int = 1):
        if isinstance(shards, str):
            raise MTNError("ShardStream takes a list of shard URLs: use list_shards(source)")
        if not shards:
            raise MTNError("no shards given to ShardStream")
        if world_size < 1 or not 0 <= rank < world_size:
            raise MTNError(f"bad rank {rank} for world size {world_size}")
        if batch_size < 1 or skip_batches < 0:
            raise MTNError(f"bad batch_size {batch_size} / skip_batches {skip_batches}")
        self.shards, self.cfg = list(shards), cfg or StreamConfig()
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.set_epoch(epoch, skip_batches)
        self._counts = dict.fromkeys(STAT_KEYS, 0)
        self._warned: dict[str, int] = {}
        if len(self.shards) < world_size:
            log.info("%d shards for %d ranks: splitting by sample index", len(self.shards), world_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def stats(self) -> dict:
        """Counts in this process: STAT_KEYS -> int."""
        return dict(self._counts)

    # ------------------------------------------------------------------------------------------- plan
    def lane_plan(self, lane: int, n_lanes: int):
        """(shards in reading order, keep(index in shard) -> bool or None) for one lane of this rank."""
        order = sorted(self.shards)  # the caller's list order plays no part
        random.Random(f"mtn-shards:{self.cfg.seed}:{self.epoch}").shuffle(order)
        world, rank = self.world_size, self.rank
        rank_split = len(order) < world
        mine = order if rank_split else order[rank::world]
        lane_split = len(mine) < n_lanes
        mine = mine if lane_split else mine[lane::n_lanes]
        if not (rank_split or lane_split):
            return mine, None

        def keep(i: int) -> bool:
            if rank_split:
                if i % world != rank:
                    return False
                i //= world
            return not lane_split or i % n_lanes == lane

        return mine, keep

    # ------------------------------------------------------------------------------------------- per sample
    def _skip(self, kind: str, where: str, reason: str, level: int = logging.WARNING) -> None:
        self._counts[kind] += 1
        n = self._warned[kind] = self._warned.get(kind, 0) + 1
        if level >= logging.WARNING and n > _WARN_LIMIT:
            level = logging.DEBUG
        log.log(level, "%s %s: %s%s", kind, where, reason,
                " (further ones at DEBUG)" if level >= logging.WARNING and n == _WARN_LIMIT else "")

    def _check(self, shard: str, key: str, files: dict[str, bytes]) -> _Raw | None:
        """Checks that need no pixel decode: image present, caption present and long enough, original size."""
        cfg, where = self.cfg, f"{shard}:{key}"
        ext = next((e for e in cfg.image_exts if e in files), None)
        if ext is None:
            self._skip("skipped_corrupt", where, f"no image ({'/'.join(cfg.image_exts)}) in {sorted(files)}")
            return None
        text = files.get(cfg.caption_ext)
        caption = text.decode("utf-8", "replace").strip() if text is not None else ""
        if not caption:
            self._skip("skipped_no_caption", where, f"no .{cfg.caption_ext} caption" if text is None else "empty caption")
            return None
        if not cfg.min_caption_chars <= len(caption) <= cfg.max_caption_chars:
            self._skip("skipped_filtered", where, f"caption of {len(caption)} chars", logging.DEBUG)
            return None
        if cfg.min_image_size > 0:
            size = _meta_size(files.get("json"))
            if size is None:
                try:
                    size = image_size(files[ext])
                except Exception as e:  # not an image at all
                    self._skip("skipped_corrupt", where, _reason(e))
                    return None
            if min(size) < cfg.min_image_size:
                self._skip("skipped_filtered", where, f"image {size[0]}x{size[1]} < {cfg.min_image_size}", logging.DEBUG)
                return None
        return _Raw(shard, key, files[ext], caption)

    def _lane_raw(self, lane: int, n_lanes: int):
        """Raw samples that passed _check, in the lane's order (shards in order, then the shuffle buffer)."""
        cfg = self.cfg
        shards, keep = self.lane_plan(lane, n_lanes)
        reader = ShardReader(shards, keep, depth=cfg.prefetch_samples, block_size=cfg.read_block_size,
                             retries=cfg.open_retries)
        rng = random.Random(f"mtn-buffer:{cfg.seed}:{self.epoch}:{self.rank}:{lane}")
        size, buf = max(1, cfg.shuffle_buffer), []
        lost, allowed = 0, cfg.max_skipped_shard_fraction * len(shards)
        for event in reader:
            if event[0] != "sample":
                self._counts[f"{event[0]}_shards"] += 1
                log.warning("%s shard %s: %s", event[0], event[1], event[2])
                lost += 1
                if lost > allowed:  # fail now: the rest of the epoch would train on less than planned
                    raise MTNError(
                        f"{lost} of the {len(shards)} shards of rank {self.rank} lane {lane} could not be read "
                        f"completely, over max_skipped_shard_fraction={cfg.max_skipped_shard_fraction} (latest: "
                        f"{event[0]} {event[1]}: {event[2]}); check the storage (an S3 outage?) and rerun, or raise "
                        "max_skipped_shard_fraction to train on what is readable")
                continue
            raw = self._check(event[1], event[3], event[4])
            if raw is None:
                continue
            if len(buf) < size:
                buf.append(raw)
                continue
            j = rng.randrange(size)
            buf[j], raw = raw, buf[j]
            yield raw
        rng.shuffle(buf)
        yield from buf

    def _sample(self, raw: _Raw, img) -> dict:
        cfg = self.cfg
        rng = (random.Random(f"mtn-aug:{cfg.seed}:{self.epoch}:{raw.shard}:{raw.key}")
               if cfg.random_flip or not cfg.center_crop else None)
        pixels = train_transform(img, cfg.resolution, cfg.center_crop, cfg.random_flip, rng)  # [3, R, R]
        self._counts["samples"] += 1
        return {"pixel_values": pixels, "caption": raw.caption, "key": raw.key, "shard": raw.shard}

    def _lane_events(self, lane: int, n_lanes: int, skip: int, keep_tail: bool):
        """{"kind": "batch", lane, r, samples} for the lane's full batches r >= skip (earlier ones are decoded to
        check them, nothing more), then {"kind": "end", lane, n: full batches, tail: leftover samples}."""
        cfg, size, r, cur = self.cfg, self.batch_size, 0, []
        for raw in self._lane_raw(lane, n_lanes):
            try:
                img = decode_image(raw.image, cfg.resolution if cfg.jpeg_draft else 0)
            except Exception as e:  # corrupt / truncated image bytes (PIL raises many types)
                self._skip("skipped_corrupt", f"{raw.shard}:{raw.key}", _reason(e))
                continue
            cur.append((raw, img))
            if len(cur) == size:
                if r < skip:
                    self._counts["resume_skipped"] += size
                else:
                    yield {"kind": "batch", "lane": lane, "r": r, "samples": [self._sample(*x) for x in cur]}
                r, cur = r + 1, []
        if not keep_tail:
            self._counts["dropped_tail"] += len(cur)
        yield {"kind": "end", "lane": lane, "n": r, "tail": [self._sample(*x) for x in cur] if keep_tail else []}

    def _produce(self, lanes, n_lanes: int, k: int, keep_tail: bool):
        """This process's lanes, one event per lane in turn (lane order, rounds)."""
        gens = [self._lane_events(lane, n_lanes, lower_bound(k, lane, n_lanes), keep_tail) for lane in lanes]
        while gens:
            for g in list(gens):
                event = next(g)
                yield event
                if event["kind"] == "end":
                    gens.remove(g)

    def _discard(self, counts: dict, n: int) -> None:
        counts["samples"] -= n
        counts["resume_skipped"] += n

    def __iter__(self):
        wid, workers = _worker()
        n_lanes = self.cfg.lanes or workers
        lanes = range(wid, n_lanes, workers)
        tails: list[dict] = []
        if workers > 1:  # a plain DataLoader with workers: each worker its lanes, no cross-worker merge
            if self.skip_batches:
                raise MTNError("exact mid-epoch resume with DataLoader workers needs make_loader(stream, ...)")
            for event in self._produce(lanes, n_lanes, 0, keep_tail=True):
                if event["kind"] == "batch":
                    yield from event["samples"]
                else:
                    tails.extend(event["tail"])
            yield from tails
            return

        def pulled(event):
            if event["kind"] == "end":
                tails.extend(event["tail"])

        events = self._produce(lanes, n_lanes, self.skip_batches, keep_tail=True)
        for _, event in merge_lanes(events, n_lanes, self.skip_batches, pulled,
                                    lambda e: self._discard(self._counts, len(e["samples"]))):
            yield from event["samples"]
        yield from tails


def _collate(samples: list[dict]) -> dict:
    pixels = [x["pixel_values"] for x in samples]  # B x [3, R, R]
    out = torch.empty((len(pixels), *pixels[0].shape), dtype=pixels[0].dtype)  # [B, 3, R, R]
    if get_worker_info() is not None:
        out.share_memory_()  # filled in place: the DataLoader then sends it without another copy
    return {"pixel_values": torch.stack(pixels, out=out),  # [B, 3, R, R]
            "captions": [x["caption"] for x in samples], "keys": [x["key"] for x in samples],
            "shards": [x["shard"] for x in samples]}


class _BatchDataset(IterableDataset):
    """What DataLoader workers run for ShardLoader: collated lane batches + lane ends (with the partial tail
    batch unless drop_last), each with stats deltas."""

    def __init__(self, stream: ShardStream, drop_last: bool = True):
        self.stream, self.drop_last = stream, drop_last

    def __iter__(self):
        s = self.stream
        wid, workers = _worker()
        n_lanes = s.cfg.lanes or workers
        prev = s.stats()
        try:
            for event in s._produce(range(wid, n_lanes, workers), n_lanes, s.skip_batches, keep_tail=not self.drop_last):
                now = s.stats()
                delta, prev = {k: now[k] - prev[k] for k in STAT_KEYS}, now
                if event["kind"] == "end":
                    tail = _collate(event["tail"]) if event["tail"] else None
                    yield {"kind": "end", "lane": event["lane"], "n": event["n"], "stats": delta, "tail": tail}
                else:
                    yield {"kind": "batch", "lane": event["lane"], "r": event["r"], "stats": delta,
                           **_collate(event["samples"])}
        except MTNError as e:  # sent as an item: raised in a DataLoader worker it would reach the user with a traceback
            yield {"kind": "error", "message": str(e)}


class ShardLoader(DataLoader):
    """A DataLoader over a ShardStream yielding {"pixel_values": [B, 3, R, R], "captions", "keys", "shards",
    "stats": deltas, "batch_index": position in this rank's epoch} in canonical order whatever the worker timing.
    drop_last (default): full batches only, each lane dropping its < B leftover samples (counted as
    dropped_tail). drop_last=False: the lanes' partial batches follow at the end (one-pass jobs such as latent
    precomputation; skip_batches only counts full batches)."""

    def __init__(self, stream: ShardStream, num_workers: int = 2, prefetch_factor: int = 4, pin_memory: bool = False,
                 multiprocessing_context=None, drop_last: bool = True):
        self.stream, self.keep_tails = stream, not drop_last
        self.n_lanes = stream.cfg.lanes or max(1, num_workers)
        self.totals = dict.fromkeys(STAT_KEYS, 0)
        super().__init__(_BatchDataset(stream, drop_last), batch_size=None, num_workers=num_workers,
                         prefetch_factor=prefetch_factor if num_workers > 0 else None, pin_memory=pin_memory,
                         persistent_workers=False, multiprocessing_context=multiprocessing_context)

    def __iter__(self):
        s = self.stream
        self.totals = dict.fromkeys(STAT_KEYS, 0)
        pending = dict.fromkeys(STAT_KEYS, 0)
        tails: list[tuple[int, dict]] = []

        def pulled(item):
            if item["kind"] == "error":
                raise MTNError(item["message"])
            for key, v in item["stats"].items():
                self.totals[key] += v
                pending[key] += v
            if item["kind"] == "end" and item.get("tail"):
                tails.append((item["lane"], item["tail"]))

        def discarded(item):
            for counts in (self.totals, pending):
                s._discard(counts, len(item["keys"]))

        def out(pos, item):
            stats = dict(pending)
            pending.update(dict.fromkeys(STAT_KEYS, 0))
            return {"pixel_values": item["pixel_values"], "captions": item["captions"], "keys": item["keys"],
                    "shards": item["shards"], "stats": stats, "batch_index": pos}

        held, nxt = None, s.skip_batches  # one batch of look-ahead: the last one carries the counts after it
        for pos, item in merge_lanes(super().__iter__(), self.n_lanes, s.skip_batches, pulled, discarded):
            if held is not None:
                yield out(*held)
            held, nxt = (pos, item), pos + 1
        for _, tail in sorted(tails, key=lambda t: t[0]) if self.keep_tails else []:
            if held is not None:
                yield out(*held)
            held, nxt = (nxt, tail), nxt + 1
        if held is not None:
            yield out(*held)


def make_loader(stream: ShardStream, batch_size: int, num_workers: int = 2, prefetch_factor: int = 4,
                pin_memory: bool | None = None, multiprocessing_context=None, drop_last: bool = True) -> ShardLoader:
    """Batches of `batch_size` from `stream` (see ShardLoader). DataLoader workers each run their lanes with a
    read-ahead thread per lane; `prefetch_factor` batches per worker wait ready. Not persistent: build one per
    epoch (new ShardStream or set_epoch). pin_memory defaults to CUDA being available. A stream built with the
    default batch_size=1 and no skip takes `batch_size` from here."""
    if batch_size != stream.batch_size:
        if stream.skip_batches:
            raise MTNError(f"make_loader batch_size {batch_size} != the stream's {stream.batch_size}: skip_batches "
                           "counts the stream's batches")
        stream.batch_size = batch_size
    if num_workers < 0:
        raise MTNError(f"num_workers must be >= 0, got {num_workers}")
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return ShardLoader(stream, num_workers, prefetch_factor, pin, multiprocessing_context, drop_last)
