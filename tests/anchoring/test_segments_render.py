"""No copy where an earlier answer can see it, through the project's own Renderer and model.

A two-turn conversation rendered with ``scope: all_user_turns`` and ``image_turn`` (one image
per turn, or one image in turn 1 only), regrouped with ``top_fraction: 1.0`` (every
candidate/image that has a partner is copied): no copy of second-turn content (a word or an
image token after the first answer starts) may land before the first answer, and every copy
shares its host's segment. The same batch with one segment for everything (``segment_ids``
all 0, the behaviour before segments) has crossing copies, so the check can fail.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from attanchor.anchoring import AnchorConfig, AnchoredVLM
from attanchor.anchoring.select import segment_ids_from_labels
from attanchor.data.collate import collate
from attanchor.data.formats import Conversation, Turn
from attanchor.data.render import Renderer
from attanchor.data.tiny import build_processor, build_tokenizer, tiny_llava_config

VOCAB = ["user", ":", "assistant", "what", "color", "is", "the", "shape", "?", "red", "size", "big", "and", "where"]
STRATEGIES = ["text_into_image", "image_into_text", "random", "append"]


def conversations() -> list[Conversation]:
    two_images = Conversation("two-images", [
        Turn("user", "<image>\nwhat color is the shape?"), Turn("assistant", "red"),
        Turn("user", "<image>\nwhat size and where is the shape?"), Turn("assistant", "big")],
        ["0.png", "1.png"])
    one_image = Conversation("one-image", [
        Turn("user", "<image>\nwhat color is the shape?"), Turn("assistant", "red"),
        Turn("user", "what size and where?"), Turn("assistant", "big")], ["1.png"])
    return [two_images, one_image]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    for i in range(2):
        Image.new("RGB", (32, 32), (200 * i, 60, 90 * (1 - i))).save(root / f"{i}.png")
    processor = build_processor(build_tokenizer(VOCAB), image_size=32)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(
        tiny_llava_config(len(processor.tokenizer), image_size=32)).eval()
    return processor, model, root


def leaks(r, labels: torch.Tensor, segments: torch.Tensor) -> tuple[int, int, int]:
    """(copies, copies of later content placed before the first answer, copies whose origin
    and host lie in different segments), summed over the batch. Baseline coordinates."""
    n = early = cross = 0
    for b in range(labels.shape[0]):
        first_answer = int((labels[b] != -100).nonzero()[0])
        copy = r.inserted[b] & (r.origin[b] >= 0)
        origin, host = r.origin[b][copy], r.host[b][copy]
        n += int(copy.sum())
        early += int(((host < first_answer) & (origin > first_answer)).sum())
        cross += int((segments[b][origin] != segments[b][host]).sum())
    return n, early, cross


@pytest.mark.parametrize("scope", ["all_user_turns", "image_turn"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_later_turn_content_before_the_first_answer(world, scope, strategy):
    processor, model, root = world
    renderer = Renderer(processor, template="llava-1.5", scope=scope, image_root=root)
    batch = collate([renderer(c) for c in conversations()],
                    pad_token_id=processor.tokenizer.pad_token_id)
    cfg = AnchorConfig(strategy=strategy, threshold=None, top_fraction=1.0)
    wrapped = AnchoredVLM(model, cfg)
    keys = ("input_ids", "pixel_values", "attention_mask", "labels", "candidate_mask",
            "sample_index")
    with torch.no_grad():
        wrapped(**{k: batch[k] for k in keys})
        segments = segment_ids_from_labels(batch["labels"], batch["attention_mask"])
        n, early, cross = leaks(wrapped.last_regrouped, batch["labels"], segments)
        assert n > 0 and early == 0 and cross == 0
        # Both turns still get anchors where they have an image (row 0 holds one per turn).
        r = wrapped.last_regrouped
        copy = r.inserted[0] & (r.origin[0] >= 0)
        assert set(segments[0][r.host[0][copy]].tolist()) == {0, 1}
        # One segment for everything, as before segments: copies cross answers.
        wrapped(**{k: batch[k] for k in keys},
                segment_ids=torch.zeros_like(batch["attention_mask"]))
        assert leaks(wrapped.last_regrouped, batch["labels"], segments)[2] > 0
