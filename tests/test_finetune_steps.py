"""The finetune job's named steps in-process, without Ray: per-micro-batch random streams, this rank's data position
across epochs, and the precomputed batch branch chosen by the config."""

import random
import types

import pytest
import torch

from jobs.finetune_unet import micro_rngs, stored_latents
from mtn import finetune
from mtn.finetune import WorkerData


def draws(seed, step, rank, micro) -> tuple[list[float], float]:
    gen, rng = micro_rngs(seed, step, rank, micro, "cpu")
    return torch.rand(3, generator=gen).tolist(), rng.random()


def test_micro_rngs_are_reproducible_and_distinct_per_tuple():
    base = draws(0, 5, 1, 0)
    assert draws(0, 5, 1, 0) == base  # a resumed step draws what it drew the first time
    neighbours = [(1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1), (0, 5, 0, 1), (0, 4, 1, 1)]
    assert all(draws(*t)[0] != base[0] and draws(*t)[1] != base[1] for t in neighbours)
    # the weighted sum this replaced (seed * 1_000_003 + step * 1009 + rank * 17 + micro) gave rank 1's micro-step 0
    # and rank 0's micro-step 17 one stream: with grad_accum=18 two micro-batches got the same noise
    assert draws(0, 1, 1, 0) != draws(0, 1, 0, 17)


def test_worker_data_rolls_over_epochs_and_resumes_at_its_position(monkeypatch):
    """The position carries the lanes its epoch is read as: a resume finishes the epoch with the saved lanes (the
    batch order depends on them), and only the next epoch takes the changed loader_workers."""
    from types import SimpleNamespace

    opened = []

    def fake_open(cfg, rank, world, epoch, skip, lanes):  # 3 batches per epoch, each with loader stats
        opened.append((epoch, skip, lanes))
        return iter([{"i": (epoch, b), "stats": {"skipped_corrupt": 1}} for b in range(skip, 3)])

    monkeypatch.setattr(finetune, "open_data", fake_open)
    data = WorkerData(cfg=SimpleNamespace(loader_workers=4), rank=0, world=1)
    data.pos.update(epoch=2, batches=1, lanes=2)  # as restored from a checkpoint written with loader_workers=2
    got = [data.next()["i"] for _ in range(4)]
    assert got == [(2, 1), (2, 2), (3, 0), (3, 1)]
    assert opened == [(2, 1, 2), (3, 0, 4)] and data.pos == {"epoch": 3, "batches": 2, "lanes": 4}
    assert data.skipped == {"skipped_corrupt": 4}
    fresh = WorkerData(cfg=SimpleNamespace(loader_workers=0), rank=0, world=1)
    fresh.next()
    assert opened[-1] == (0, 0, 1)  # no loader processes: one lane, read in the main process


def fake_worker(train_mtn: bool, empty):
    cfg = types.SimpleNamespace(caption_dropout=0.5, train_mtn=train_mtn, precomputed="lat")
    return types.SimpleNamespace(cfg=cfg, engine=types.SimpleNamespace(device=torch.device("cpu")), empty=empty)


def dropped_rows(n: int, rng_seed: int) -> list[bool]:
    rng = random.Random(rng_seed)
    return [rng.random() < 0.5 for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 3])
def test_stored_latents_prompt_embeds_dropout_rows_become_the_empty_prompt(seed):
    b = 8
    batch = {"latent_mean": torch.randn(b, 4, 2, 2), "latent_std": torch.zeros(b, 4, 2, 2),
             "text": torch.ones(b, 3, 5)}
    w = fake_worker(train_mtn=False, empty=torch.full((1, 3, 5), -1.0))
    latents, text = stored_latents(w, batch, torch.Generator().manual_seed(0), random.Random(seed))
    assert torch.equal(latents, batch["latent_mean"])  # std 0: the posterior sample is its mean
    drop = dropped_rows(b, seed)
    assert [bool((row == -1).all()) for row in text] == drop and [bool((row == 1).all()) for row in text] == [
        not d for d in drop]


def test_stored_latents_follow_the_config_not_the_batch_keys():
    b = 6
    batch = {"latent_mean": torch.zeros(b, 4, 2, 2), "latent_std": torch.ones(b, 4, 2, 2),
             "source": torch.ones(b, 4, 7), "source_mask": torch.ones(b, 4, dtype=torch.long)}
    empty = (torch.full((1, 4, 7), -1.0), torch.tensor([[1, 0, 0, 0]]))
    latents, (src, mask) = stored_latents(fake_worker(True, empty), batch, torch.Generator().manual_seed(0),
                                          random.Random(1))
    assert latents.std() > 0.5  # sampled: mean 0 + std 1 x noise
    drop = dropped_rows(b, 1)
    assert [bool((r == -1).all()) for r in src] == drop and [m.tolist() == [1, 0, 0, 0] for m in mask] == drop
    with pytest.raises(KeyError, match="text"):  # train_mtn=false wants prompt embeddings: no key sniffing
        stored_latents(fake_worker(False, empty[0]), batch, torch.Generator().manual_seed(0), random.Random(1))
