"""Streaming img2dataset-style webdataset shards (`NNNNN.tar` of `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`)
from S3 (s3fs; endpoint and keys from the standard AWS_* settings, so MinIO works) or local disk, for UNet
finetuning. Reader: plain sequential tar parsing over an fsspec stream + a read-ahead thread per sub-stream.

Why not Ray Data (read_webdataset + ray.train.get_dataset_shard): open-source Ray has no exact mid-epoch resume
(ray-project/ray#37633 is still open; Anyscale's "mid-epoch resumption" is a RayTurbo-only feature), its
streaming order is not reproducible by default, a corrupt image or a cut tar fails the read/map task instead of
being counted, and it was slower here. Image decode + resize, not reading, bounds the loader: throughput scales
with loader workers (CPU cores). Measured with `python bench/streaming.py`: BENCHMARKS.md, "Streaming shards".

Order. The epoch's shard list is shuffled by (seed, epoch) and dealt to ranks (`shards[rank::world]`), then to
`lanes` sub-streams per rank (default: one per DataLoader worker). Each lane reads its shards in order through
a shuffle buffer seeded by (seed, epoch, rank, lane) and cuts full batches; lane batch r of lane l sits at
canonical position "round r, then lane order" (lanes that ran out drop out of later rounds). With fewer shards
than ranks (or than lanes) the split is by sample index inside each shard instead: every sample still goes to
exactly one (rank, lane), at the price of each reader scanning (not decoding) the others' samples.

Resume. `skip_batches=k` (batches this rank consumed in this epoch) is exact: a lane first replays its first
ceil((k - lane) / lanes) batches, which were certainly consumed, checking images (decode) but without resize,
crop or transfer; ShardLoader (mtn.data.loader) re-merges the lanes in canonical order in the main process (the
DataLoader's worker round-robin plays no part) and drops the few remaining consumed batches that exist only when some lane
ran out before position k. Same shards, seed, epoch, world size, lanes (num_workers) and batch size required.

World size. The split is a pure function of (shard list, seed, epoch, world size, lanes): `epoch_order` then
`lane_shards` (`python bench/scale.py` checks it at 512 ranks x 8 lanes x 100,000 shards). A resume with another
world size (a node lost for good, or added) cannot continue an epoch: the old ranks' positions do not map onto the
new split. `resume_position` defines what happens: every new rank starts at batch 0 of the first epoch no old rank
had fed a batch of (max over the old ranks of epoch, +1 where it had fed batches). At an epoch boundary nothing is
lost; mid-epoch the rest of the interrupted epoch (on ranks that ran ahead, also of the next) is skipped rather
than fed again, so no sample is ever fed twice within an epoch. The finetune refuses such a resume unless
resume=force (num_workers is not a RESUMABLE key, mtn/train/resume.py), and under ZeRO >= 1 even then (DeepSpeed
cannot load ZeRO optimizer state on another world size); a failed worker replaced by Ray keeps the world size
and resumes exactly.

Stats. Each make_loader batch carries "stats": the STAT_KEYS counts since the previous batch over all loader
workers (the last batch also those after it), so they sum to the epoch's totals (`loader.totals`, a running sum);
`ShardStream.stats()` counts only the calling process. Failed or truncated shards are skipped and counted, but
once a lane has lost more than `max_skipped_shard_fraction` of its shards the stream raises MTNError (in the main
process, also from loader workers): an S3 outage fails the run, not its data.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from mtn.data.imageproc import decode_image, image_size, train_transform
from mtn.data.lanes import in_turn, lower_bound, merge_lanes
from mtn.data.shardio import ShardReader, list_shards
from mtn.errors import MTNError

__all__ = ["STAT_KEYS", "ShardStream", "StreamConfig", "epoch_order", "lane_shards", "list_shards", "resume_position",
           "uncount", "worker_slot"]

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
    jpeg_draft: bool = True  # decode JPEGs at the smallest DCT scale still >= resolution (faster: BENCHMARKS.md)
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


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) outside a worker."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def uncount(counts: dict, n: int) -> None:
    """Move `n` samples of a batch consumed before the resume point from "samples" to "resume_skipped"."""
    counts["samples"] -= n
    counts["resume_skipped"] += n


def epoch_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order, the same on every rank: sorted (the caller's list order plays no part), then
    shuffled by (seed, epoch)."""
    order = sorted(shards)
    random.Random(f"mtn-shards:{seed}:{epoch}").shuffle(order)
    return order


def lane_shards(order: list[str], rank: int, world: int, lane: int, n_lanes: int):
    """One (rank, lane)'s share of an epoch_order: (shards in reading order, keep(index in shard) -> bool, or None
    when whole shards are read). Shards are dealt `order[rank::world]`, then `[lane::n_lanes]`; with fewer shards
    than ranks (or a rank's shards than lanes) every shard goes to all of them and sample i to the one
    i % world == rank (then (i // world) % n_lanes == lane)."""
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


def resume_position(saved: dict[int, dict], rank: int, world: int) -> tuple[dict, str | None]:
    """This rank's data position {"epoch", "batches"[, "lanes"]} from the positions a checkpoint's ranks saved ({old rank:
    position}) -> (position, a note to print, None when the resume is exact). Same world size: its own position.
    Another one: batch 0 of the first epoch no old rank had fed a batch of (module docstring, "World size")."""
    if not saved:
        return {"epoch": 0, "batches": 0}, "no data positions in the checkpoint: the data starts again at epoch 0"
    old = len(saved)
    if set(saved) == set(range(world)):
        return dict(saved[rank]), None  # with the lanes its epoch is read as, when saved (jobs/finetune_unet.py)
    epoch = max(p["epoch"] + (p["batches"] > 0) for p in saved.values())
    started = sorted({p["epoch"] for p in saved.values() if p["batches"] > 0})
    if not started:
        return {"epoch": epoch, "batches": 0}, (f"world size {old} -> {world} at the start of epoch {epoch}: its "
                                                "shards are split over the new ranks")
    span = f"epoch {started[0]}" if len(started) == 1 else f"epochs {started[0]}-{started[-1]}"
    return {"epoch": epoch, "batches": 0}, (f"world size {old} -> {world} mid-{span}: the rest of {span} is skipped, "
                                            f"training continues at epoch {epoch} with the new split; no sample is "
                                            "fed twice")


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
    tails; use mtn.data.loader.make_loader() for batches, exact resume with workers, and stats in the main process."""

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
        return lane_shards(epoch_order(self.shards, self.cfg.seed, self.epoch), self.rank, self.world_size, lane,
                           n_lanes)

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

    def events(self, lanes, n_lanes: int, k: int, keep_tail: bool):
        """The given lanes' events (see _lane_events), one per lane in turn (lane order, rounds); what a
        ShardStream iteration and mtn.data.loader's workers consume."""
        return in_turn(self._lane_events(lane, n_lanes, lower_bound(k, lane, n_lanes), keep_tail) for lane in lanes)

    def __iter__(self):
        wid, workers = worker_slot()
        n_lanes = self.cfg.lanes or workers
        lanes = range(wid, n_lanes, workers)
        tails: list[dict] = []
        if workers > 1:  # a plain DataLoader with workers: each worker its lanes, no cross-worker merge
            if self.skip_batches:
                raise MTNError("exact mid-epoch resume with DataLoader workers needs mtn.data.loader.make_loader(stream, ...)")
            for event in self.events(lanes, n_lanes, 0, keep_tail=True):
                if event["kind"] == "batch":
                    yield from event["samples"]
                else:
                    tails.extend(event["tail"])
            yield from tails
            return

        def pulled(event):
            if event["kind"] == "end":
                tails.extend(event["tail"])

        events = self.events(lanes, n_lanes, self.skip_batches, keep_tail=True)
        for _, event in merge_lanes(events, n_lanes, self.skip_batches, pulled,
                                    lambda e: uncount(self._counts, len(e["samples"]))):
            yield from event["samples"]
        yield from tails
