"""Packed collate (attanchor.data.packing): first-fit rows, pack ids, positions, labels."""

from __future__ import annotations

import pytest
import torch

from attanchor.data.collate import sample_index
from attanchor.data.packing import pack_rows, packed_collate
from attanchor.data.render import RenderedSample


def sample(sid: str, ids: list[int], labelled: list[int], cands: list[int] = (),
           images: int = 0) -> RenderedSample:
    n = len(ids)
    labels = torch.tensor([ids[i] if i in labelled else -100 for i in range(n)])
    cand = torch.tensor([i in cands for i in range(n)])
    pv = torch.full((images, 3, 2, 2), float(len(sid))) if images else None
    return RenderedSample(sid, torch.tensor(ids), labels, cand, pv)


def test_pack_rows_by_hand():
    # [3, 2, 2, 1] in rows of 5: 8 tokens -> 2 rows; longest first into the
    # emptiest row: 3 -> r0, 2 -> r1, 2 -> r1 (2 < 3), 1 -> r0 (3 < 4): rows of 4 and 4.
    assert pack_rows([3, 2, 2, 1], 5) == [[0, 3], [1, 2]]
    assert pack_rows([4, 4, 1, 1], 5) == [[0, 2], [1, 3]]
    assert pack_rows([5], 5) == [[0]]
    # 2 rows by size (9 / 5), but 3 + 3 overflows one: a 3rd row is opened.
    assert pack_rows([3, 3, 3], 5) == [[0], [1], [2]]
    assert pack_rows([3, 3, 2, 2], 5) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="sample 1 has 6 tokens"):
        pack_rows([1, 6], 5)


def test_golden_packed_batch():
    # rows: 7 tokens -> 2 rows of 5; "a" (3) alone, "b" and "cc" (2 + 2) together.
    s = [sample("a", [11, 12, 13], [2], [1]), sample("b", [21, 22], [0, 1]),
         sample("cc", [31, 32], [1], images=1)]
    b = packed_collate(s, pad_token_id=0, max_length=5)
    assert b["input_ids"].tolist() == [[11, 12, 13, 0], [21, 22, 31, 32]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["pack_ids"].tolist() == [[0, 0, 0, -1], [1, 1, 2, 2]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    # Each sample's first label is dropped: packed, "cc"'s 31 would be "b"'s last target.
    assert b["labels"].tolist() == [[-100, -100, 13, -100], [-100, 22, -100, 32]]
    assert b["candidate_mask"].tolist() == [[False, True, False, False], [False] * 4]
    assert b["ids"] == ["a", "b", "cc"]
    assert b["sample_index"].tolist() == [sample_index(i) for i in ("a", "b", "cc")]
    assert b["pixel_values"].shape == (1, 3, 2, 2)


def test_images_follow_the_packed_order():
    # rows [a, ccc] and [bb]: images must follow the rows, not the input order.
    s = [sample("a", [1, 5, 5], [2], images=1), sample("bb", [1, 5, 5, 7], [3], images=1),
         sample("ccc", [1, 5], [1], images=1)]
    b = packed_collate(s, pad_token_id=0, max_length=5)
    assert b["ids"] == ["a", "ccc", "bb"]
    assert b["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 2.0]  # len(id) marks each
    assert b["pack_ids"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]


def test_errors_name_the_sample():
    with pytest.raises(ValueError, match="sample long: .* 4 tokens"):
        packed_collate([sample("long", [1, 2, 3, 4], [3])], pad_token_id=0, max_length=3)
    with pytest.raises(ValueError, match="empty batch"):
        packed_collate([], pad_token_id=0, max_length=3)
    with pytest.raises(ValueError, match="pad_token_id is None"):
        packed_collate([sample("a", [1], [0])], pad_token_id=None, max_length=3)


def test_packed_loader_from_the_data_module(tiny_world):
    from attanchor.data.datamodule import VLMDataModule

    w = tiny_world
    dm = VLMDataModule(model_path=str(w["model"]), train_file=str(w["data"] / "train.json"),
                       image_root=str(w["images"]), max_length=128, batch_size=5, packing=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    n = int(batch["attention_mask"].sum())
    assert len(batch["ids"]) == 5 and batch["input_ids"].shape[1] <= 128
    assert batch["pack_ids"].max().item() == 4
    assert batch["pixel_values"].shape[0] == 5  # one image per easy-vqa record
    ds = dm.datasets["train"]
    where = {ds.index[i].id: i for i in range(len(ds))}
    assert n == sum(len(ds[where[i]].input_ids) for i in batch["ids"])  # every token, no pad
