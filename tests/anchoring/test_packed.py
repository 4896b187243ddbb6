"""Packed anchored forward (attanchor.anchoring.packed): the same per-token loss as unpacked,
positions restarting per sample, copies confined to their sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.anchoring.packed import block_causal_mask, packed_forward, sample_spans
from attanchor.data.collate import collate
from attanchor.data.formats import Conversation, Turn
from attanchor.data.packing import packed_collate
from attanchor.data.render import RenderedSample

IMG = 5
KEYS = ("input_ids", "pixel_values", "attention_mask", "labels", "candidate_mask",
        "sample_index")
STRATEGIES = [AnchorConfig(strategy="none"), AnchorConfig(threshold=None, top_fraction=0.3),
              AnchorConfig(threshold=0.0, max_anchors=2)]


def one_token_llava() -> LlavaForConditionalGeneration:
    """A LLaVA whose 8x8 image is one patch: one image token per image (CLS dropped)."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=8, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=1, num_attention_heads=4, projection_dim=64)
    text = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def hand_sample(sid: str, ids: list[int], labelled: list[int], cands: list[int]
                ) -> RenderedSample:
    labels = torch.tensor([t if i in labelled else -100 for i, t in enumerate(ids)])
    cand = torch.tensor([i in cands for i in range(len(ids))])
    n_img = ids.count(IMG)
    pv = torch.randn(n_img, 3, 8, 8, generator=torch.Generator().manual_seed(len(sid))) \
        if n_img else None
    return RenderedSample(sid, torch.tensor(ids), labels, cand, pv)


def test_golden_positions_and_segments_of_a_tiny_packed_case():
    # s0 = [bos, I, c, c, A], s1 = [bos, I, c, A]; threshold -1 copies every candidate, and a
    # sample's only image is every candidate's best match.
    s0 = hand_sample("s0", [1, IMG, 20, 21, 30], [4], [2, 3])
    s1 = hand_sample("s1", [1, IMG, 22, 31], [3], [2])
    b = packed_collate([s0, s1], pad_token_id=0, max_length=9)
    assert b["pack_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    m = AnchoredVLM(one_token_llava(), AnchorConfig(threshold=-1.0))
    with torch.no_grad():
        out, lay = packed_forward(m, **{k: b[k] for k in KEYS}, pack_ids=b["pack_ids"])
    # regrouped: [1, I, 20*, 21*, 20, 21, 30 | 1, I, 22*, 22, 31]
    assert lay.sample.tolist() == [[0] * 7 + [1] * 5]
    assert lay.offset.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    assert lay.labels.tolist() == [[-100] * 6 + [30] + [-100] * 4 + [31]]
    assert lay.regrouped.origin.tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 2, 3, -1, -1]]
    assert out.logits.shape == (1, 12, 64)


def test_block_causal_mask_by_hand():
    assert block_causal_mask(torch.tensor([[0, 0, 1]]))[0, 0].int().tolist() == \
        [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_a_candidate_only_matches_images_of_its_own_sample():
    # s1 has a candidate but no image; s0's image is in the same row. Regrouped as one
    # sequence, s1's word would be copied into s0's image span; packed, it has no host.
    s0 = hand_sample("s0", [1, IMG, 20, 30], [3], [2])
    s1 = hand_sample("s1", [1, 22, 31], [2], [1])
    b = packed_collate([s0, s1], pad_token_id=0, max_length=8)
    m = AnchoredVLM(one_token_llava(), AnchorConfig(threshold=-1.0))
    with torch.no_grad():
        _, lay = packed_forward(m, **{k: b[k] for k in KEYS}, pack_ids=b["pack_ids"])
    assert lay.regrouped.num_anchors.tolist() == [1, 0]
    assert lay.sample.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]  # one copy, in sample 0's span


def test_malformed_pack_ids_are_refused():
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="exactly where attention_mask"):
        sample_spans(torch.tensor([[0, 0, -1, -1]]), mask)
    with pytest.raises(ValueError, match="row-major order"):
        sample_spans(torch.tensor([[1, 1, 0, -1]]), mask)
    with pytest.raises(ValueError, match="row-major order"):
        sample_spans(torch.tensor([[0, 1, 0, -1]]), mask)


# --------------------------------------------------------------- exactness on rendered data

@pytest.fixture(scope="module")
def world(tiny_world):
    from attanchor.data.datamodule import VLMDataModule

    w = tiny_world
    dm = VLMDataModule(model_path=str(w["model"]), train_file=str(w["data"] / "train.json"),
                       image_root=str(w["images"]), max_length=256)
    dm.setup("fit")
    ds = dm.datasets["train"]
    samples = [ds[i] for i in range(6)]
    # A two-turn record (two answers, so two segments inside one sample) and a text-only one.
    c0, c1 = ds.index[0], ds.index[1]
    two = Conversation("two-turn", c0.turns + [Turn("user", c1.turns[0].text.replace(
        "<image>", "").strip()), c1.turns[1]], c0.images)
    text = Conversation("text-only", [Turn("user", c1.turns[0].text.replace("<image>", "")
                                           .strip()), c1.turns[1]], [])
    samples += [ds.renderer(two), ds.renderer(text)]
    hf = LlavaForConditionalGeneration.from_pretrained(w["model"], attn_implementation="sdpa")
    return {"samples": samples, "pad": dm.pad_token_id, "hf": hf.eval()}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss (B, L) of predicting labels[:, i + 1] from logits[:, i]; 0 if none."""
    tgt = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=-100,
                           reduction="none")


@pytest.mark.parametrize("attention", ["mask", "positions"])
@pytest.mark.parametrize("cfg", STRATEGIES, ids=["none", "text_into_image", "capped"])
def test_packed_per_token_loss_equals_unpacked(world, cfg, attention):
    b = packed_collate(world["samples"], world["pad"], max_length=200)
    assert b["input_ids"].shape[0] < len(world["samples"])  # several samples share rows
    by_id = {s.id: s for s in world["samples"]}
    u = collate([by_id[i] for i in b["ids"]], world["pad"])  # the same samples, padded
    m = AnchoredVLM(world["hf"], cfg)
    with torch.no_grad():
        ref = m(**{k: u[k] for k in KEYS})
        ref_labels = u["labels"] if m.last_regrouped is None else m.last_regrouped.labels
        ref_anchors = None if m.last_regrouped is None else m.last_regrouped.num_anchors
        out, lay = packed_forward(m, **{k: b[k] for k in KEYS}, pack_ids=b["pack_ids"],
                                  attention=attention)
    if ref_anchors is not None:
        assert torch.equal(lay.regrouped.num_anchors, ref_anchors) and ref_anchors.sum() > 0
    real = lay.sample >= 0
    want = token_losses(ref.logits, ref_labels)[lay.sample[real], lay.offset[real]]
    got = token_losses(out.logits, lay.labels)[real]
    assert int((lay.labels != -100).sum()) == int((ref_labels != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # positions restart at 0 for every sample
    starts = real & (lay.offset == 0)
    assert (lay.position_ids[starts] == 0).all() and int(starts.sum()) == len(b["ids"])


def test_packed_gradients_equal_unpacked(world):
    cfg = AnchorConfig(threshold=None, top_fraction=0.3)
    samples = world["samples"][:4]
    b = packed_collate(samples, world["pad"], max_length=200)
    by_id = {s.id: s for s in samples}
    u = collate([by_id[i] for i in b["ids"]], world["pad"])
    m = AnchoredVLM(world["hf"], cfg)
    proj = world["hf"].model.multi_modal_projector.linear_1.weight
    grads = []
    for run in ("unpacked", "packed"):
        world["hf"].zero_grad(set_to_none=True)
        if run == "unpacked":
            loss = m(**{k: u[k] for k in KEYS}).loss
        else:
            loss = packed_forward(m, **{k: b[k] for k in KEYS}, pack_ids=b["pack_ids"])[0].loss
        loss.backward()
        grads.append(proj.grad.clone())
    world["hf"].zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_anchor_module_takes_the_packed_branch(world, tiny_world):
    from attanchor.train.module import AnchorModule, ModelSettings

    module = AnchorModule(str(tiny_world["model"]),
                          anchor=AnchorConfig(threshold=None, top_fraction=0.3),
                          model=ModelSettings(mode="full"))
    module.configure_model()
    module.eval()
    samples = world["samples"][:4]
    b = packed_collate(samples, world["pad"], max_length=200)
    by_id = {s.id: s for s in samples}
    u = collate([by_id[i] for i in b["ids"]], world["pad"])
    with torch.no_grad():
        packed, padded = module(b), module(u)
    assert packed.logits.shape[0] < padded.logits.shape[0]  # rows, not samples
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
