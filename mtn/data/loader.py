"""Batches from a ShardStream through a DataLoader: each worker runs its lanes, the main process re-merges the lane
batches in canonical order (so worker timing never changes the order or the resume point) and carries the stats
deltas. Order, resume and stats are described in mtn.data.shards."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtn.data.lanes import merge_lanes
from mtn.data.shards import STAT_KEYS, ShardStream, uncount, worker_slot
from mtn.errors import MTNError


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
        wid, workers = worker_slot()
        n_lanes = s.cfg.lanes or workers
        prev = s.stats()
        try:
            for event in s.events(range(wid, n_lanes, workers), n_lanes, s.skip_batches, keep_tail=not self.drop_last):
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
                uncount(counts, len(item["keys"]))

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
