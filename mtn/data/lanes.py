"""Canonical batch order over lanes (sub-streams) for mtn.data.shards, and what exact resume skips at the source.

Lane l's full batch r sits at canonical position "round r, then lane order"; lanes that ran out drop out of later
rounds. Whatever order the lanes' items arrive in (DataLoader workers, threads), merge_lanes restores it.
"""

from __future__ import annotations

from collections import deque


def lower_bound(k: int, lane: int, n_lanes: int) -> int:
    """Batches of `lane` surely among the first k canonical ones: batch r sits at position <= r * n_lanes + lane."""
    return max(0, -(-(k - lane) // n_lanes))


def in_turn(lanes):
    """The lanes' events one per lane in turn (lane order, rounds) until each lane's "end" event: what a rank's
    readers (mtn.data.shards.ShardStream.events) hand to merge_lanes."""
    gens = list(lanes)
    while gens:
        for g in list(gens):
            event = next(g)
            yield event
            if event["kind"] == "end":
                gens.remove(g)


def merge_lanes(items, n_lanes: int, k: int, on_pull=None, on_discard=None):
    """Canonical order over lane items (each lane's items in order, lanes interleaved any way): yields
    (position, batch item) for positions >= k. A lane's batches r < ceil((k - lane) / n_lanes) were skipped at the
    source and only counted here; later consumed ones (some lane ran out early) are passed to on_discard."""
    items = iter(items)
    bufs = [deque() for _ in range(n_lanes)]
    last = [-1] * n_lanes  # highest batch index seen per lane
    ends: list[int | None] = [None] * n_lanes  # full batches per lane, once its end item came
    low = [lower_bound(k, lane, n_lanes) for lane in range(n_lanes)]

    def has(lane: int, r: int) -> bool:
        while ends[lane] is None and last[lane] < r:
            try:
                item = next(items)
            except StopIteration:
                raise RuntimeError(f"shard stream: lane {lane} stopped without its end marker") from None
            if on_pull:
                on_pull(item)
            if item["kind"] == "end":
                ends[item["lane"]] = item["n"]
            else:
                bufs[item["lane"]].append(item)
                last[item["lane"]] = item["r"]
        return ends[lane] is None or r < ends[lane]

    pos, r = 0, 0
    while True:
        alive = False
        for lane in range(n_lanes):
            if not has(lane, r):
                continue
            alive = True
            if r < low[lane]:  # skipped by the lane itself
                pos += 1
                continue
            item = bufs[lane].popleft()
            if pos < k:
                if on_discard:
                    on_discard(item)
            else:
                yield pos, item
            pos += 1
        if not alive:
            break
        r += 1
    for item in items:  # nothing is expected after every lane's end; keep the counts anyway
        if on_pull:
            on_pull(item)
