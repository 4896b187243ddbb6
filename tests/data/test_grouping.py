"""Length-grouped batch order (attanchor.data.grouping): golden order, invariants, lengths."""

from __future__ import annotations

import numpy as np
import pytest

from attanchor.data.formats import Conversation, Turn
from attanchor.data.grouping import (
    _splitmix64,
    conversation_length,
    length_grouped_indices,
    modality_lengths,
    padding_fraction,
)

LENGTHS = [5, 1, 4, 2, 3, 6, 7, 8, 9, 1]
MULTIMODAL = [True, False] * 5  # even records have images


def test_splitmix64_matches_the_reference_sequence():
    # splitmix64 seeded with 0 yields 0xe220a8397b1dcdaf, then 0x6e789e6aa1b965f4 (its state
    # advances by the golden gamma 0x9e3779b97f4a7c15 before each output).
    x = np.array([0, 0x9E3779B97F4A7C15], dtype=np.uint64)
    assert [hex(int(v)) for v in _splitmix64(x)] == ["0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4"]


def test_golden_order_of_a_small_case():
    # One batch per megabatch: each modality's shuffle is cut into pairs, each pair sorted
    # longest first; the full batches are shuffled, the partial ones form the tail.
    order = length_grouped_indices(LENGTHS, MULTIMODAL, 2, seed=0, epoch=0, megabatch_batches=1)
    assert order == [5, 3, 7, 9, 8, 4, 0, 2, 6, 1]
    # Hand check: batches (5, 3), (7, 9), (8, 4), (0, 2) are one modality each (odd: text;
    # even: images) and longest first (6 >= 2, 8 >= 1, 9 >= 3, 5 >= 4); the tail holds the
    # image modality's leftover 6 then the text one's 1.
    blocks = [order[i:i + 2] for i in range(0, 8, 2)]
    for a, b in blocks:
        assert MULTIMODAL[a] == MULTIMODAL[b] and LENGTHS[a] >= LENGTHS[b]
    assert order[8:] == [6, 1]


def test_one_megabatch_groups_by_sorted_length():
    lengths = [5, 1, 4, 2, 3, 6]  # the module doc's example
    order = length_grouped_indices(lengths, [True] * 6, 2, seed=3, epoch=1)
    batches = {frozenset(order[i:i + 2]) for i in range(0, 6, 2)}
    assert batches == {frozenset({5, 0}), frozenset({2, 4}), frozenset({3, 1})}
    assert padding_fraction(lengths, order, 2) == pytest.approx(3 / 24)  # 1 pad per batch


@pytest.mark.parametrize("n,batch", [(0, 4), (1, 4), (37, 4), (100, 7), (64, 8)])
def test_a_permutation_for_any_size(n, batch):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 500, n).tolist()
    mm = (rng.random(n) < 0.7).tolist()
    order = length_grouped_indices(lengths, mm, batch, seed=1, epoch=2)
    assert sorted(order) == list(range(n))


def test_pure_function_of_seed_and_epoch_so_resumable():
    rng = np.random.default_rng(0)
    lengths, mm = rng.integers(1, 900, 500).tolist(), (rng.random(500) < 0.5).tolist()
    first = length_grouped_indices(lengths, mm, 8, seed=7, epoch=3)
    # A resumed run recomputes the epoch's order from (seed, epoch) alone.
    assert length_grouped_indices(list(lengths), list(mm), 8, seed=7, epoch=3) == first
    assert length_grouped_indices(lengths, mm, 8, seed=7, epoch=4) != first
    assert length_grouped_indices(lengths, mm, 8, seed=8, epoch=3) != first


def test_full_batches_are_one_modality_and_pad_less_than_a_shuffle():
    rng = np.random.default_rng(1)
    n, batch = 1000, 16
    mm = (rng.random(n) < 0.6).tolist()
    lengths = [int(x) for x in rng.lognormal(5, 0.8, n)]
    order = length_grouped_indices(lengths, mm, batch, seed=0, epoch=0)
    n_full = (sum(mm) // batch) + ((n - sum(mm)) // batch)
    for i in range(n_full):
        block = order[i * batch:(i + 1) * batch]
        assert len({mm[j] for j in block}) == 1
        assert [lengths[j] for j in block] == sorted((lengths[j] for j in block), reverse=True)
    shuffled = rng.permutation(n).tolist()
    assert padding_fraction(lengths, order, batch) < padding_fraction(lengths, shuffled,
                                                                       batch) / 3


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="2 modality flags"):
        length_grouped_indices([1, 2, 3], [True, False], 2, 0, 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        length_grouped_indices([1], [True], 0, 0, 0)
    with pytest.raises(ValueError, match="record 1 has length -3"):
        length_grouped_indices([1, -3], [True, True], 1, 0, 0)


def test_padding_fraction_by_hand():
    assert padding_fraction([3, 1], [0, 1], 2) == pytest.approx(2 / 6)
    assert padding_fraction([3, 1], [0, 1], 1) == 0.0


def test_conversation_length_estimate():
    conv = Conversation("a", [Turn("user", "<image>\nwhat color is it?"),
                              Turn("assistant", "red")], ["x.png"])
    # 5 words -> ceil(6.5) = 7, 2 turns -> 8, one image of 64 tokens
    assert conversation_length(conv, 64) == 7 + 8 + 64
    assert modality_lengths([conv], image_tokens=64) == ([79], [True])
    with pytest.raises(ValueError, match="image_tokens"):
        modality_lengths([conv])


def test_modality_lengths_of_a_dataset_are_the_rendered_lengths(tiny_world):
    from attanchor.data.datamodule import VLMDataModule

    w = tiny_world
    dm = VLMDataModule(model_path=str(w["model"]), train_file=str(w["data"] / "train.json"),
                       image_root=str(w["images"]), max_length=128)
    dm.setup("fit")
    ds = dm.datasets["train"]
    lengths, mm = modality_lengths(ds)
    assert len(lengths) == len(ds) and all(mm)
    assert lengths[:5] == [len(ds[i].input_ids) for i in range(5)]  # 64 image tokens each
