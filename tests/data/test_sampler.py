"""ResumableSampler: golden orders, the rank split, the mid-epoch state round trip."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from attanchor.data.sampler import ResumableSampler


def _ranks(n: int, world: int, **kw) -> list[ResumableSampler]:
    return [ResumableSampler(n, num_replicas=world, rank=r, **kw) for r in range(world)]


def test_golden_orders_for_ten_samples_on_two_ranks():
    r0, r1 = _ranks(10, 2)
    # A DistributedSampler: Lightning wraps any other sampler of a multi-process run in a
    # second rank split (tests/train/test_resume_exact.py's 2-process case fails then).
    assert isinstance(r0, DistributedSampler)
    assert r0.order(0) == [4, 1, 7, 5, 3, 9, 0, 8, 6, 2]  # torch.randperm(10), seed 0 + epoch 0
    assert list(r0) == [4, 7, 3, 0, 6] and list(r1) == [1, 5, 9, 8, 2]
    for s in (r0, r1):
        s.set_epoch(1)
    assert list(r0) == [5, 1, 0, 9, 7] and list(r1) == [6, 2, 8, 3, 4]
    # The same epoch again: the same order (a function of (seed, epoch) only).
    assert list(r0) == [5, 1, 0, 9, 7]


def test_ranks_are_disjoint_and_cover_the_dataset_with_padding_or_drop():
    # 7 samples, seed 3: order [5, 3, 4, 6, 0, 2, 1]; padded with its head to 8.
    r0, r1 = _ranks(7, 2, seed=3)
    assert list(r0) == [5, 4, 0, 1] and list(r1) == [3, 6, 2, 5] and len(r0) == len(r1) == 4
    d0, d1 = _ranks(7, 2, seed=3, drop_last=True)
    assert list(d0) == [5, 4, 0] and list(d1) == [3, 6, 2] and len(d0) == 3
    for world in (2, 3, 4):
        parts = [list(s) for s in _ranks(12, world, seed=1)]
        assert sorted(sum(parts, [])) == list(range(12))  # 12 divides: no pad, disjoint
        assert all(len(p) == 12 // world for p in parts)


@pytest.mark.parametrize(("n", "world", "drop_last"), [(10, 3, False), (10, 3, True),
                                                       (7, 2, False), (5, 1, False)])
def test_same_batches_as_the_distributed_sampler_it_replaces(n, world, drop_last):
    for rank in range(world):
        for epoch in (0, 2):
            d = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=5,
                                   drop_last=drop_last)
            s = ResumableSampler(n, num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
            d.set_epoch(epoch)
            s.set_epoch(epoch)
            assert list(s) == list(d) and len(s) == len(d)


def test_state_round_trip_mid_epoch_resumes_each_rank_where_it_stopped():
    before = _ranks(10, 2)
    for s in before:
        s.set_epoch(1)
        s.consumed = 4  # two batches of 1 per rank, or one of 2: 4 positions over both ranks
    states = [s.state_dict() for s in before]
    assert states[0] == {"epoch": 1, "consumed": 4, "num_samples": 10, "seed": 0,
                         "num_replicas": 2}
    after = _ranks(10, 2)
    for s, st in zip(after, states, strict=True):
        s.load_state_dict(st)
        s.set_epoch(1)  # Lightning sets the epoch again before iterating: the skip survives
    # epoch 1 is [5, 1, 0, 9, 7] / [6, 2, 8, 3, 4]: the first two of each are done
    assert list(after[0]) == [0, 9, 7] and list(after[1]) == [8, 3, 4]
    assert len(after[0]) == 5  # always the full count: Lightning counts the skipped batches
    assert list(after[0]) == [5, 1, 0, 9, 7]  # the skip applied once; the next pass is whole
    # The next epoch starts from its beginning.
    late = ResumableSampler(10, num_replicas=2, rank=0)
    late.load_state_dict(states[0])
    late.set_epoch(2)
    assert late.consumed == 0 and len(list(late)) == 5


def test_resume_on_another_world_size_trains_the_rest_once():
    state = {"epoch": 0, "consumed": 4, "num_samples": 10, "seed": 0, "num_replicas": 2}
    one = ResumableSampler(10)
    one.load_state_dict(state)
    assert list(one) == [3, 9, 0, 8, 6, 2]  # order(0)[4:]


def test_state_from_other_data_or_seed_is_refused():
    s = ResumableSampler(10)
    with pytest.raises(ValueError, match="num_samples=12, this run 10"):
        s.load_state_dict({"epoch": 0, "consumed": 2, "num_samples": 12, "seed": 0})
    with pytest.raises(ValueError, match="seed=7, this run 0"):
        s.load_state_dict({"epoch": 0, "consumed": 2, "num_samples": 10, "seed": 7})
    with pytest.raises(ValueError, match="consumed=11 outside 0..10"):
        s.load_state_dict({"epoch": 0, "consumed": 11, "num_samples": 10, "seed": 0})


def test_order_fn_replaces_the_shuffle_and_must_be_a_permutation():
    s = ResumableSampler(4, num_replicas=2, rank=1, order_fn=lambda e: [3, 2, 1, 0][e:] +
                         [3, 2, 1, 0][:e])
    assert list(s) == [2, 0]
    s.set_epoch(1)
    assert list(s) == [1, 3]  # order [2, 1, 0, 3]
    bad = ResumableSampler(4, order_fn=lambda e: [0, 1, 1, 2])
    with pytest.raises(ValueError, match="not a permutation of range"):
        list(bad)


def test_group_by_length_takes_the_order_from_the_grouping_module(tiny_world):
    from attanchor.data import grouping
    from attanchor.data.datamodule import VLMDataModule

    d = tiny_world["data"]
    dm = VLMDataModule(str(tiny_world["model"]), train_file=str(d / "train.json"),
                       image_root=str(d / "images"), batch_size=4, seed=3,
                       group_by_length=True)
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ResumableSampler)
    lengths, multimodal = grouping.modality_lengths(dm.datasets["train"])
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        assert list(sampler) == grouping.length_grouped_indices(lengths, multimodal, 4, 3,
                                                                epoch)
    plain = VLMDataModule(str(tiny_world["model"]), train_file=str(d / "train.json"),
                          image_root=str(d / "images"), batch_size=4, seed=3)
    plain.setup("fit")
    assert list(plain.train_dataloader().sampler) == ResumableSampler(len(lengths),
                                                                      seed=3).order(0)
