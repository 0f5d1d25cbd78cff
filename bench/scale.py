"""Shard assignment at scale, by simulation: mtn.data.shards' own split of a LAION-sized shard list, no I/O.

    python bench/scale.py --ranks 512 --loader-workers 8 --shards 100000
    python bench/scale.py --ranks 64 --loader-workers 4 --shards 5000 --json

Synthetic shards (seeded; sample counts lognormal around --mean-samples like img2dataset's LAION shards, with a
tail of small and empty ones) go through `epoch_order` + `lane_shards` (what every ShardStream.lane_plan runs) for
--ranks x --loader-workers lanes, and lane batches go through mtn.data.lanes.merge_lanes as make_loader runs them.
Checks (the exit status is 1 when one fails, naming it):
  coverage      every shard in exactly one (rank, lane), so every sample once per epoch; the split by sample index
                (fewer shards than ranks, or than lanes) on small cases, sample by sample
  determinism   the same (seed, epoch) gives the same split whatever the list order; another epoch another one
  resume        one rank's epoch resumed at many k (with lanes of uneven length, running out, empty) is exactly
                the suffix of the uninterrupted batch sequence, sample ids included
  world size    a resume with the same world size feeds what the uninterrupted run feeds; with another one
                (mtn.data.shards.resume_position, what jobs/finetune_unet.py does) no sample is fed twice
                within an epoch, where the former restore (keep a rank's old position) did
Printed besides: the per-rank and per-lane imbalance in samples, what it means in steps (WorkerData starts a rank's
next epoch as soon as its share runs out, so rank epochs drift apart) and the time the assignment took.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtn.data.lanes import in_turn, lower_bound, merge_lanes  # noqa: E402
from mtn.data.shards import ShardStream, StreamConfig, epoch_order, lane_shards, resume_position  # noqa: E402


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Shards:
    """Synthetic shard list: names, samples per shard, and each shard's first global sample id."""

    names: list[str]
    counts: dict[str, int]
    first: dict[str, int]


def synthetic_shards(n: int, mean: float, seed: int, prefix: str = "s3://laion-sim/") -> Shards:
    """`n` shards: ~97% lognormal(sigma 0.25) around `mean` samples, 2.5% small (< mean / 10), 0.5% empty."""
    rng = np.random.default_rng(seed)
    counts = np.maximum(0, rng.lognormal(np.log(mean), 0.25, n)).astype(np.int64)
    tail = rng.random(n)
    counts[tail < 0.03] = rng.integers(0, max(1, int(mean) // 10), int((tail < 0.03).sum()))
    counts[tail < 0.005] = 0
    names = [f"{prefix}{i:0{len(str(n))}d}.tar" for i in range(n)]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return Shards(names, dict(zip(names, counts.tolist(), strict=True)), dict(zip(names, first.tolist(), strict=True)))


def split(shards: list[str], seed: int, epoch: int, world: int, lanes: int, assign=lane_shards):
    """[rank][lane] -> (shards, keep) of one epoch; the order is computed once, as every rank computes it."""
    order = epoch_order(shards, seed, epoch)
    return [[assign(order, rank, world, lane, lanes) for lane in range(lanes)] for rank in range(world)]


def lane_ids(sh: Shards, shards: list[str], keep) -> np.ndarray:
    """Global sample ids a lane reads, in reading order (the shuffle buffer, seeded per lane, is left out)."""
    parts = [np.arange(sh.first[s], sh.first[s] + sh.counts[s]) for s in shards]
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if keep is None:
        return ids
    starts = np.concatenate([np.full(sh.counts[s], sh.first[s]) for s in shards]) if parts else ids
    return ids[[keep(int(i)) for i in ids - starts]]


# ----------------------------------------------------------------------------------------------- checks
def check_coverage(sh: Shards, plan, label: str) -> Check:
    """Every shard read whole by exactly one (rank, lane), or its samples split so that each is kept once."""
    whole: dict[str, tuple] = {}
    kept: dict[str, Counter] = {}
    dup = []
    for rank, lanes in enumerate(plan):
        for lane, (shards, keep) in enumerate(lanes):
            for s in shards:
                if keep is None:
                    if s in whole:
                        dup.append(f"{s} in rank/lane {whole[s]} and {(rank, lane)}")
                    whole[s] = (rank, lane)
                else:
                    kept.setdefault(s, Counter()).update(i for i in range(sh.counts[s]) if keep(i))
    both = set(whole) & set(kept)
    missing = [s for s in sh.names if s not in whole and s not in kept]
    bad = [f"{s}:{i} kept {c}x" for s, cnt in kept.items() for i, c in cnt.items() if c != 1]
    bad += [f"{s}: {sh.counts[s] - len(cnt)} samples unread" for s, cnt in kept.items() if len(cnt) != sh.counts[s]]
    problems = dup + [f"{s} read whole and split" for s in both] + [f"{s} unassigned" for s in missing] + bad
    samples = sum(sh.counts[s] for s in whole) + sum(len(c) for c in kept.values())
    if problems:
        return Check(f"coverage {label}", False, f"{len(problems)} problems, e.g. {'; '.join(problems[:3])}")
    how = "whole shards" if not kept else ("samples split by index" if not whole else "whole + split")
    return Check(f"coverage {label}", True, f"{len(sh.names):,} shards, {samples:,} samples, each once ({how})")


def imbalance(sh: Shards, plan, batch: int, grad_accum: int) -> dict:
    """Samples per rank and lane, batches per rank-epoch (each lane drops its < batch tail) and the epoch drift."""
    lane_samples = np.array([[sum(sh.counts[s] for s in shards) for shards, _ in lanes] for lanes in plan])
    rank_samples = lane_samples.sum(1)
    lane_batches = lane_samples // batch
    n = lane_batches.sum(1)  # batches per rank-epoch
    tail = (lane_batches - lane_batches.min(1, keepdims=True)).sum(1)  # batches after the rank's first lane ended
    spread = int(n.max() - n.min())
    return {"samples_per_rank_mean": float(rank_samples.mean()), "rank_max_over_mean": rank_samples.max() / rank_samples.mean(),
            "rank_min_over_mean": rank_samples.min() / rank_samples.mean(),
            "lane_max_over_mean": lane_samples.max() / lane_samples.mean(),
            "lane_min_over_mean": lane_samples.min() / lane_samples.mean(),
            "steps_per_rank_epoch_min": int(n.min()) // grad_accum, "steps_per_rank_epoch_max": int(n.max()) // grad_accum,
            "drift_steps_per_epoch": spread / grad_accum,
            "epochs_until_one_epoch_apart": float(n.min() / spread) if spread else float("inf"),
            "worst_lane_tail_frac": float((tail / np.maximum(n, 1)).max()),
            "worst_rank_lanes": lane_batches[int(np.argmax(tail))].tolist()}


def check_determinism(shards: list[str], seed: int, epoch: int, world: int, lanes: int, plan) -> Check:
    shuffled = random.Random(1).sample(shards, len(shards))
    again = split(shuffled, seed, epoch, world, lanes)
    same = [[s for s, _ in r] for r in again] == [[s for s, _ in r] for r in plan]
    owner = {s: (r, lane) for r, ls in enumerate(plan) for lane, (ss, _) in enumerate(ls) for s in ss}
    nxt = split(shards, seed, epoch + 1, world, lanes)
    moved = sum(owner.get(s) != (r, lane) for r, ls in enumerate(nxt) for lane, (ss, _) in enumerate(ls) for s in ss)
    differs = [[s for s, _ in r] for r in nxt] != [[s for s, _ in r] for r in plan]
    return Check("determinism", same and differs,
                 f"same (seed, epoch), shuffled input list: {'identical' if same else 'DIFFERENT'}; epoch {epoch + 1}: "
                 f"{'different' if differs else 'IDENTICAL'}, {moved / max(1, len(shards)):.1%} of shards on another "
                 "rank/lane")


def lane_events(lengths: list[int], k: int, skip_at_source=lower_bound):
    """What ShardStream.events yields for one rank whose lanes have `lengths` full batches: each lane's batches
    r >= skip_at_source(k, lane, n) in turn (lane order, rounds), then its end marker."""
    n_lanes = len(lengths)

    def one(lane: int):
        n = lengths[lane]
        for r in range(min(n, skip_at_source(k, lane, n_lanes)), n):
            yield {"kind": "batch", "lane": lane, "r": r}
        yield {"kind": "end", "lane": lane, "n": n}

    return in_turn(one(lane) for lane in range(len(lengths)))


def rank_batches(lanes: list[np.ndarray], batch: int, k: int = 0, skip_at_source=lower_bound):
    """One rank's epoch through merge_lanes from position k -> (positions, sample ids of those batches [n, batch],
    batches discarded in the merge). A lane batch's ids: lane `l`, batch `r` holds lanes[l][r * batch:][:batch]."""
    lengths = [len(ids) // batch for ids in lanes]
    discarded = []
    out = list(merge_lanes(lane_events(lengths, k, skip_at_source), len(lanes), k, None, discarded.append))
    starts = np.cumsum([0] + [len(ids) for ids in lanes])[:-1]  # each lane's first id in `flat`
    flat = np.concatenate(lanes) if lanes else np.zeros(0, np.int64)
    first = np.array([starts[e["lane"]] + e["r"] * batch for _, e in out], np.int64)  # [n]
    ids = flat[first[:, None] + np.arange(batch)] if len(out) else np.zeros((0, batch), np.int64)  # [n, batch]
    return [p for p, _ in out], ids, len(discarded)


def check_resume(lanes: list[np.ndarray], batch: int, label: str, ks=None, skip_at_source=lower_bound) -> Check:
    """Resume at each k == the uninterrupted sequence's suffix (positions and sample ids), and the skipped + the
    discarded batches make exactly k."""
    n_lanes, lengths = len(lanes), [len(ids) // batch for ids in lanes]
    pos, full, _ = rank_batches(lanes, batch)  # the reference: the default skip_at_source does nothing at k=0
    total = len(full)
    ordered = np.sort(full, axis=None)
    if pos != list(range(total)) or (ordered[1:] == ordered[:-1]).any() or total != sum(lengths):
        return Check(f"resume {label}", False, "the uninterrupted sequence is not each lane batch once")
    if ks is None:  # the start, past the first round, the middle, just after each lane ran out, the end
        ks = {1, n_lanes + 1, total // 2, total - 1, total} | {sum(min(n, m) for n in lengths) + 1 for m in lengths}
    ks = sorted(k for k in ks if 0 <= k <= total)
    for k in ks:
        try:
            p, got, discarded = rank_batches(lanes, batch, k, skip_at_source)
        except (IndexError, RuntimeError) as e:  # merge_lanes met batches it did not expect
            return Check(f"resume {label}", False, f"resume at k={k} failed: {type(e).__name__}: {e}")
        at_source = sum(min(n, skip_at_source(k, lane, n_lanes)) for lane, n in enumerate(lengths))
        if p != list(range(k, total)) or not np.array_equal(got, full[k:]) or at_source + discarded != k:
            return Check(f"resume {label}", False, f"resume at k={k} is not the suffix of the uninterrupted run")
    return Check(f"resume {label}", True, f"{n_lanes} lanes of {min(lengths)}-{max(lengths)} batches, "
                 f"{len(ks)} resume points incl. after lanes ran out: exact suffix (sample ids)")


# ----------------------------------------------------------------------------------------------- world size
def epoch_batches(sh: Shards, seed: int, lanes: int, batch: int, world: int, epoch: int, rank: int, cache: dict):
    """One rank's batches of sample ids [n, batch] of one epoch, in canonical order (cached)."""
    key = (epoch, rank, world)
    if key not in cache:
        plan = split(sh.names, seed, epoch, world, lanes)[rank]
        cache[key] = rank_batches([lane_ids(sh, s, keep) for s, keep in plan], batch)[1]
    return cache[key]


def simulate(sh: Shards, seed: int, lanes: int, batch: int, world: int, pos: dict[int, dict], steps: int, fed, cache):
    """`steps` lockstep steps of `world` ranks from positions `pos` (updated), one batch per rank and step, a rank
    whose share ran out starting its next epoch (as WorkerData does); fed ids go to fed[epoch] (a Counter)."""
    for _ in range(steps):
        for rank in range(world):
            p = pos[rank]
            if p["batches"] >= len(epoch_batches(sh, seed, lanes, batch, world, p["epoch"], rank, cache)):
                p.update(epoch=p["epoch"] + 1, batches=0)
            got = epoch_batches(sh, seed, lanes, batch, world, p["epoch"], rank, cache)[p["batches"]]
            fed.setdefault(p["epoch"], Counter()).update(got.tolist())
            p["batches"] += 1


def check_world_change(sh: Shards, seed: int, lanes: int, batch: int, old: int, new: int) -> Check:
    """Train with `old` ranks until half of them have started epoch 1 (rank epochs drift), checkpoint, resume with
    `new` ranks for as many steps: no sample twice in an epoch (with old == new, exactly what an uninterrupted run
    feeds); the former restore (a rank kept its old position) must show doubles, or the check proves nothing."""
    cache: dict = {}
    steps = int(np.median([len(epoch_batches(sh, seed, lanes, batch, old, 0, r, cache)) for r in range(old)])) + 1
    fed: dict[int, Counter] = {}
    start = {r: {"epoch": 0, "batches": 0} for r in range(old)}
    simulate(sh, seed, lanes, batch, old, start, steps, fed, cache)
    saved = {r: dict(p) for r, p in start.items()}
    resumed = {r: resume_position(saved, r, new)[0] for r in range(new)}
    note = resume_position(saved, 0, new)[1]
    simulate(sh, seed, lanes, batch, new, resumed, steps, fed, cache)
    twice = sum(c - 1 for cnt in fed.values() for c in cnt.values() if c > 1)
    label = f"world size {old} -> {new}"
    if old == new:
        ref: dict[int, Counter] = {}
        simulate(sh, seed, lanes, batch, old, {r: {"epoch": 0, "batches": 0} for r in range(old)}, 2 * steps, ref, cache)
        ok = fed == ref and twice == 0 and note is None
        return Check(label, ok, "resume == uninterrupted run" if ok else "resume differs from the uninterrupted run")
    former: dict[int, Counter] = {}  # the restore before: a rank kept its old position (new ranks: epoch 0)
    simulate(sh, seed, lanes, batch, old, {r: {"epoch": 0, "batches": 0} for r in range(old)}, steps, former, cache)
    kept = {r: dict(saved.get(r, {"epoch": 0, "batches": 0})) for r in range(new)}
    simulate(sh, seed, lanes, batch, new, kept, steps, former, cache)
    former_twice = sum(c - 1 for cnt in former.values() for c in cnt.values() if c > 1)
    def feedable(e: int) -> int:  # samples in the old ranks' full batches of epoch e (lane tails never are fed)
        return batch * sum(len(epoch_batches(sh, seed, lanes, batch, old, e, r, cache)) for r in range(old))

    skipped = ", ".join(f"{1 - len(fed.get(e, ())) / feedable(e):.0%} of epoch {e}"
                        for e in sorted({p["epoch"] for p in saved.values() if p["batches"]}))
    ok = twice == 0 and former_twice > 0
    return Check(label, ok, f"{twice} samples twice in an epoch (the former restore: {former_twice}); unfed: "
                 f"{skipped}. Rank 0 prints: {note}")


# ----------------------------------------------------------------------------------------------- main
def run_checks(ranks: int, lanes: int, n_shards: int, mean: float, batch: int, grad_accum: int, seed: int,
               epoch: int = 0, assign=lane_shards) -> tuple[list[Check], dict]:
    numbers: dict = {"ranks": ranks, "lanes": lanes, "shards": n_shards}
    sh = synthetic_shards(n_shards, mean, seed)
    numbers["samples"] = sum(sh.counts.values())
    t0 = time.perf_counter()
    order = epoch_order(sh.names, seed, epoch)
    t1 = time.perf_counter()
    plan = [[assign(order, r, ranks, lane, lanes) for lane in range(lanes)] for r in range(ranks)]
    t2 = time.perf_counter()
    stream = ShardStream(sh.names, StreamConfig(seed=seed), rank=ranks - 1, world_size=ranks, epoch=epoch)
    last = stream.lane_plan(lanes - 1, lanes)  # what a loader worker computes for its lane at an epoch start
    t3 = time.perf_counter()
    numbers.update(order_ms=1e3 * (t1 - t0), all_lanes_ms=1e3 * (t2 - t1), lane_plan_ms=1e3 * (t3 - t2))
    same = last[0] == plan[ranks - 1][lanes - 1][0] and last[1] is plan[ranks - 1][lanes - 1][1] is None
    checks = [Check("ShardStream.lane_plan", same, f"rank {ranks - 1} lane {lanes - 1}: "
                    + ("the same shards as epoch_order + lane_shards" if same else "DIFFERS from the split checked")),
              check_coverage(sh, plan, f"{ranks} ranks x {lanes} lanes")]
    for n, world, n_lanes in ((5, 8, 4), (12, 8, 4), (22, 6, 4)):  # split by sample index: ranks, lanes, some lanes
        small = synthetic_shards(n, 37, seed + n, prefix="local/")
        checks.append(check_coverage(small, split(small.names, seed, epoch, world, n_lanes, assign),
                                     f"{n} shards, {world} ranks x {n_lanes} lanes"))
    numbers.update(imbalance(sh, plan, batch, grad_accum))
    checks.append(check_determinism(sh.names, seed, epoch, ranks, lanes, plan))
    worst = int(np.argmax([np.ptp([sum(sh.counts[s] for s in ss) for ss, _ in ls]) for ls in plan]))
    checks.append(check_resume([lane_ids(sh, s, k) for s, k in plan[worst]], batch,
                               f"rank {worst} (most uneven lanes)"))
    crafted = [np.arange(a, a + n * 3) for a, n in ((0, 5), (100, 0), (200, 3), (300, 7), (400, 1))]
    checks.append(check_resume(crafted, 3, "crafted lanes of 5/0/3/7/1 batches, every k", ks=range(17)))
    small = synthetic_shards(400, 30, seed + 1, prefix="local/")
    for old, new in ((16, 16), (16, 12), (12, 16)):
        checks.append(check_world_change(small, seed, 4, 4, old, new))
    return checks, numbers


def report(checks: list[Check], numbers: dict) -> str:
    n = numbers
    lines = [f"{n['ranks']} ranks x {n['lanes']} lanes, {n['shards']:,} shards, {n['samples']:,} samples",
             f"  assignment time      epoch order {n['order_ms']:.0f} ms + all {n['ranks'] * n['lanes']:,} lanes "
             f"{n['all_lanes_ms']:.0f} ms; one ShardStream.lane_plan (per loader worker and epoch) "
             f"{n['lane_plan_ms']:.0f} ms",
             f"  samples per rank     mean {n['samples_per_rank_mean']:,.0f}, max/mean {n['rank_max_over_mean']:.3f}, "
             f"min/mean {n['rank_min_over_mean']:.3f}",
             f"  samples per lane     max/mean {n['lane_max_over_mean']:.3f}, min/mean {n['lane_min_over_mean']:.3f}",
             f"  steps per rank-epoch {n['steps_per_rank_epoch_min']:,}-{n['steps_per_rank_epoch_max']:,}: "
             f"rank epochs drift {n['drift_steps_per_epoch']:,.0f} steps per epoch, a whole epoch apart after "
             f"{n['epochs_until_one_epoch_apart']:.0f} epochs",
             f"  lane tail            worst rank: {n['worst_lane_tail_frac']:.1%} of its batches come after its "
             "first lane ran out", ""]
    width = max(len(c.name) for c in checks)
    lines += [f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in checks]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=512)
    p.add_argument("--loader-workers", type=int, default=8, help="lanes per rank (one per DataLoader worker)")
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--mean-samples", type=float, default=10_000, help="samples per shard, lognormal around this")
    p.add_argument("--micro-batch", type=int, default=8, help="batch per rank (finetune_sd14_t5.yaml: 2048 / 256)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the checks and numbers as JSON")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    checks, numbers = run_checks(args.ranks, args.loader_workers, args.shards, args.mean_samples, args.micro_batch,
                                 args.grad_accum, args.seed)
    numbers["wall_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "numbers": numbers}, indent=2, default=float))
    else:
        print(report(checks, numbers) + f"\n{numbers['wall_s']:.1f} s")
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
