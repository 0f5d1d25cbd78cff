"""bench/scale.py's checks of the shard split at a smaller scale, proof that they can fail, and the data position
after a resume with another world size (mtn.data.shards.resume_position, jobs/finetune_unet.py restore_extra)."""

import json

import numpy as np
import pytest

from bench import scale
from mtn.data.lanes import lower_bound
from mtn.data.shards import lane_shards, resume_position


def test_checks_pass_at_64_ranks_4_lanes_5000_shards(capsys):
    checks, numbers = scale.run_checks(ranks=64, lanes=4, n_shards=5000, mean=200, batch=8, grad_accum=1, seed=3)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed
    names = " | ".join(c.name for c in checks)
    for part in ("ShardStream.lane_plan", "coverage 64 ranks x 4 lanes", "coverage 5 shards, 8 ranks", "determinism",
                 "resume rank", "resume crafted", "world size 16 -> 16", "world size 16 -> 12", "world size 12 -> 16"):
        assert part in names
    assert numbers["samples"] == sum(scale.synthetic_shards(5000, 200, 3).counts.values())
    assert 1.0 < numbers["rank_max_over_mean"] < 1.5 and 0.5 < numbers["rank_min_over_mean"] < 1.0


def test_main_exit_status_and_json(capsys):
    assert scale.main(["--ranks", "8", "--loader-workers", "2", "--shards", "300", "--mean-samples", "50",
                       "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["numbers"]["ranks"] == 8 and all(c["ok"] for c in out["checks"])


def _duplicating(order, rank, world, lane, n_lanes):
    shards, keep = lane_shards(order, rank, world, lane, n_lanes)
    return (shards + [order[0]], keep) if (rank, lane) == (1, 0) else (shards, keep)


def _dropping(order, rank, world, lane, n_lanes):
    shards, keep = lane_shards(order, rank, world, lane, n_lanes)
    return (shards[1:], keep) if (rank, lane) == (2, 1) else (shards, keep)


def _bad_sample_split(order, rank, world, lane, n_lanes):
    shards, keep = lane_shards(order, rank, world, lane, n_lanes)
    return shards, (None if keep is None else (lambda i: i % 3 == 0))  # every third sample, on every rank


@pytest.mark.parametrize("assign, expect", [(_duplicating, "in rank/lane"), (_dropping, "unassigned"),
                                            (_bad_sample_split, "kept")])
def test_a_broken_assignment_fails_the_coverage_check(assign, expect):
    checks, _ = scale.run_checks(ranks=16, lanes=4, n_shards=400, mean=40, batch=4, grad_accum=1, seed=0,
                                 assign=assign)
    bad = [c for c in checks if c.name.startswith("coverage") and not c.ok]
    assert bad and expect in bad[0].detail


def test_the_resume_check_fails_when_a_lane_skips_one_batch_too_many():
    lanes = [np.arange(a, a + n * 3) for a, n in ((0, 5), (100, 0), (200, 3), (300, 7))]
    assert scale.check_resume(lanes, 3, "crafted", ks=range(16)).ok
    check = scale.check_resume(lanes, 3, "crafted", ks=range(16),
                               skip_at_source=lambda k, lane, n: lower_bound(k, lane, n) + (k > 0))
    assert not check.ok and "k=1" in check.detail


def test_world_size_change_check_catches_the_former_restore(monkeypatch):
    sh = scale.synthetic_shards(200, 30, 1, prefix="local/")
    assert scale.check_world_change(sh, 0, 2, 4, 8, 6).ok
    # a resume that kept each rank's old position (the restore before) must fail the check
    monkeypatch.setattr(scale, "resume_position", lambda saved, rank, world: (dict(saved.get(rank, {"epoch": 0,
                                                                                   "batches": 0})), None))
    check = scale.check_world_change(sh, 0, 2, 4, 8, 6)
    assert not check.ok and "samples twice" in check.detail and not check.detail.startswith("0 ")


# ----------------------------------------------------------------------------------------------- resume_position
def test_resume_position_same_world_is_exact():
    saved = {0: {"epoch": 3, "batches": 17, "lanes": 2}, 1: {"epoch": 4, "batches": 2, "lanes": 2}}
    # the lanes come back too: the rest of the epoch is read as the same lanes (their order fixes the batches)
    assert resume_position(saved, 1, 2) == ({"epoch": 4, "batches": 2, "lanes": 2}, None)


def test_resume_position_other_world_mid_epoch_moves_to_the_next_epoch():
    saved = {r: {"epoch": 3, "batches": 10 + r} for r in range(16)}
    pos, note = resume_position(saved, 5, 8)
    assert pos == {"epoch": 4, "batches": 0}
    assert note == ("world size 16 -> 8 mid-epoch 3: the rest of epoch 3 is skipped, training continues at epoch 4 "
                    "with the new split; no sample is fed twice")
    skewed = {0: {"epoch": 3, "batches": 500}, 1: {"epoch": 4, "batches": 3}, 2: {"epoch": 4, "batches": 0}}
    assert resume_position(skewed, 0, 4)[0] == {"epoch": 5, "batches": 0}
    assert "mid-epochs 3-4" in resume_position(skewed, 0, 4)[1]


def test_resume_position_other_world_at_an_epoch_boundary_keeps_the_epoch():
    saved = {r: {"epoch": 2, "batches": 0} for r in range(4)}
    pos, note = resume_position(saved, 0, 6)
    assert pos == {"epoch": 2, "batches": 0} and "at the start of epoch 2" in note
    mixed = {0: {"epoch": 2, "batches": 0}, 1: {"epoch": 1, "batches": 40}}  # rank 0 ran out of epoch 1 first
    assert resume_position(mixed, 0, 3)[0] == {"epoch": 2, "batches": 0}


def test_finetune_restore_reads_every_ranks_position(tmp_path, capsys):
    from jobs.finetune_unet import restore_extra

    for r, pos in enumerate([{"epoch": 3, "batches": 120}, {"epoch": 3, "batches": 120}, {"epoch": 4, "batches": 1},
                             {"epoch": 3, "batches": 120}]):
        (tmp_path / f"data_rank{r}.json").write_text(json.dumps(pos))
    same = {"epoch": 0, "batches": 0}
    restore_extra(2, 4, same, None)(tmp_path)
    assert same == {"epoch": 4, "batches": 1} and capsys.readouterr().out == ""
    for rank in (1, 0):  # a node of 2 ranks lost for good: every new rank at batch 0 of epoch 5, rank 0 says so
        pos = {"epoch": 0, "batches": 0}
        restore_extra(rank, 2, pos, None)(tmp_path)
        assert pos == {"epoch": 5, "batches": 0}
    out = capsys.readouterr().out
    assert out.count("world size 4 -> 2 mid-epochs 3-4") == 1 and "continues at epoch 5" in out


def test_resume_with_another_world_size_auto_refuses_force_goes_on_unless_zero(tmp_path, capsys):
    from mtn.errors import MTNError
    from mtn.finetune_config import FinetuneConfig
    from mtn.train import resume

    def checkpoint(zero_stage: int):  # laid out as Ray Train 2.60 leaves it
        old = FinetuneConfig(name="r", storage_path=str(tmp_path), num_workers=4, batch_size=8, zero_stage=zero_stage)
        ckpt = tmp_path / "r" / "checkpoint_2026-12-01_19-00-00.000000"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / resume.STATE_FILE).write_text(json.dumps({"step": 3, "config": old.to_dict()}))
        (tmp_path / "r" / resume.SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {
            "checkpoint_dir_name": ckpt.name, "metrics": {}}}))

    new = {"name": "r", "storage_path": str(tmp_path), "num_workers": 2, "batch_size": 8}
    checkpoint(zero_stage=0)
    with pytest.raises(MTNError) as e:
        resume.check_resume(FinetuneConfig(**new, zero_stage=0))
    assert "num_workers 4 -> 2" in str(e.value) and "resume=force" in str(e.value)
    assert "skips the rest of the epoch and continues at the next one" in str(e.value)
    resume.check_resume(FinetuneConfig(**new, zero_stage=0, resume="force"))
    assert "num_workers 4 -> 2" in capsys.readouterr().out
    checkpoint(zero_stage=2)  # DeepSpeed refuses to re-partition ZeRO optimizer state: say so before workers start
    for mode in ("auto", "force"):
        with pytest.raises(MTNError, match="ZeRO-2 optimizer state is partitioned over num_workers=4: DeepSpeed "
                                           "cannot load it on 2 workers, even with resume=force"):
            resume.check_resume(FinetuneConfig(**new, zero_stage=2, resume=mode))
