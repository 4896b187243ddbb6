"""Qwen2.5-VL as an anchoring family: baseline, hosts and multimodal rotary positions.

Qwen2.5-VL numbers every token with a (t, h, w) triple (M-RoPE). ``model.model.get_rope_index``
gives text runs t = h = w = a running count; an image run whose merged grid is H x W starts at
the running count p and gets t = p, h = p + row, w = p + column (raster order), after which the
count jumps to p + max(H, W). Pads get (0, 0, 0). The regroup changes the sequence, so its
positions cannot be re-derived from ids: they are the baseline's own triples, carried through
the regroup's index map (``Regrouped.origin`` / ``host``).

The position rule (``positions``):
- an original token keeps its baseline triple (``origin``);
- an inserted copy takes its HOST's triple (the image token it follows for text copies, the
  text token it follows for ``image_into_text`` image copies): ``host``;
- a pause token takes the triple of the original token it follows (the one before it in the
  regrouped row; a pause token before any original takes the first original's);
- padding gets (0, 0, 0), as ``get_rope_index`` does.

Worked example (merge 2, one 1 x 4 x 4-patch image = a 2 x 2 merged grid, text ``a b``)::

    baseline   : [<vs>, I00, I01, I10, I11, <ve>,  a,   b ]
    t          : [ 0,    1,   1,   1,   1,   3,    4,   5 ]
    h          : [ 0,    1,   1,   2,   2,   3,    4,   5 ]
    w          : [ 0,    1,   2,   1,   2,   3,    4,   5 ]
    text_into_image, ``b`` matches I01 (the last token of merged-grid row 0):
    regrouped  : [<vs>, I00, I01, b*, I10, I11, <ve>,  a,   b ]
    (t, h, w) of b* = I01's (1, 1, 2); every other token keeps its triple.

Why this rule: every original token, and so every token the model is trained on or decodes
from, sees exactly the positions the unanchored model sees (``none`` is exact by
construction, and anchored decoding continues from the same last triple, ``+ 1`` on every
axis, as HF's own generation does); the copy sits at zero rotary distance from its host, which
is what "placing a word on the patch it describes" means for a 3-D rotary code. Positions are
no longer unique, which rotary attention accepts (it only uses differences).
Alternatives rejected: renumbering the regrouped sequence with ``get_rope_index`` (every token
after the first copy shifts, the image grid's h/w steps are broken by a text token inside an
image run, and prompts and answers see positions the model never saw); a copy keeping its own
(origin) triple (a text copy inside the image would carry a position later than the whole
image, an image copy inside the text one from inside the grid: both point away from the host);
LLaVA's 1-D 0..n'-1 (Qwen's image positions are not 1-D).

``<|vision_start|>`` / ``<|vision_end|>`` are text tokens: never hosts (``host_mask`` is the
image-pad tokens only) and never candidates (the renderer marks them template text).

Generation always passes explicit (3, B, L') position ids: without them HF falls back to 1-D
positions, or to a ``model.model.rope_deltas`` cached by an earlier call, both silently wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attanchor.anchoring.family import Baseline, _floating, _place, unwrap
from attanchor.anchoring.regroup import Regrouped


def mm_token_type_ids(input_ids: Tensor, image_token_id: int) -> Tensor:
    """(B, L) int: 1 at image tokens, 0 elsewhere (no videos), what Qwen's processor returns."""
    return (input_ids == image_token_id).int()


def map_positions(base_positions: Tensor, out: Regrouped) -> Tensor:
    """(3, B, L) baseline triples -> (3, B, L') triples of the regrouped sequence (module doc).

    Invariants: where ``out.inserted`` is False and ``out.origin >= 0`` the result equals
    ``base_positions`` at ``origin``; a copy equals its host's triple; pads are 0.
    """
    three, B, L = base_positions.shape
    Lp = out.origin.shape[1]
    dev = base_positions.device
    origin, host, inserted = out.origin.to(dev), out.host.to(dev), out.inserted.to(dev)
    original = (origin >= 0) & ~inserted  # (B, L')
    copy = inserted & (origin >= 0)
    pause = inserted & (origin < 0)
    ar = torch.arange(Lp, device=dev).expand(B, Lp)
    # Pause tokens: the original before them; the first original's when none precedes.
    last_orig = torch.where(original, ar, -1).cummax(dim=1).values  # (B, L')
    first_orig = torch.where(original, ar, Lp).amin(dim=1, keepdim=True).clamp(max=Lp - 1)
    before = torch.where(last_orig >= 0, last_orig, first_orig.expand(B, Lp))
    pause_src = origin.gather(1, before.clamp(min=0))
    src = torch.where(original, origin, torch.where(copy, host, pause_src))  # (B, L')
    keep = original | copy | (pause & (pause_src >= 0))
    src = src.clamp(min=0).unsqueeze(0).expand(three, B, Lp)
    pos = base_positions.gather(2, src)  # (3, B, L')
    return pos.masked_fill(~keep.unsqueeze(0), 0)


class QwenVLFamily:
    """``Qwen2_5_VLForConditionalGeneration``: merged-patch image tokens with (t, h, w)
    positions (module doc). ``image_keys``: the vision tower needs ``pixel_values`` (flattened
    patches, (sum of patches, C * T * P * P)) and ``image_grid_thw`` (N_images, 3);
    ``mm_token_type_ids`` (B, L) rides along so HF's own forward / generate (strategy
    ``none``) computes the 3-D positions instead of silently falling back to 1-D ones."""

    name = "qwen2_5_vl"
    image_keys: tuple[str, ...] = ("pixel_values", "image_grid_thw", "mm_token_type_ids")

    def dummy_images(self, model: nn.Module, like: Tensor) -> dict[str, Tensor]:
        """One all-zero image of the smallest grid the tower takes: grid (1, merge, merge),
        ``merge**2`` patches of C * T * P * P values, in ``like``'s dtype and device."""
        vc = unwrap(model).config.vision_config
        merge, patch = int(vc.spatial_merge_size), int(vc.patch_size)
        width = int(vc.in_channels) * int(vc.temporal_patch_size) * patch * patch
        return {"pixel_values": torch.zeros((merge * merge, width), dtype=like.dtype,
                                            device=like.device),
                "image_grid_thw": torch.tensor([[1, merge, merge]], device=like.device)}

    def features(self, model: nn.Module, images: dict[str, Tensor], like: Tensor,
                 **image_kw: Any) -> Tensor:
        """Images -> (N_tokens, d) merged features in raster order per image, in ``like``'s
        dtype/device (``get_image_features(...).pooler_output``: one tensor per image)."""
        if images.get("image_grid_thw") is None:
            raise ValueError("Qwen2.5-VL: the batch has pixel_values but no image_grid_thw; "
                             "collate them from the processor's output (batch['image_grid_thw'])")
        tower = unwrap(model).get_image_features(
            pixel_values=_floating(images["pixel_values"], like),
            image_grid_thw=images["image_grid_thw"], return_dict=True, **image_kw)
        return torch.cat(list(tower.pooler_output), dim=0).to(like.device, like.dtype)

    def host_mask(self, model: nn.Module, input_ids: Tensor, images: dict[str, Tensor] | None
                  ) -> Tensor:
        """(B, L) bool: the image-pad tokens (never ``<|vision_start|>`` / ``<|vision_end|>``)."""
        return input_ids == int(unwrap(model).config.image_token_id)

    def rope_positions(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                       images: dict[str, Tensor] | None) -> Tensor:
        """(3, B, L): the model's own positions, ``get_rope_index`` by keyword (its second
        positional argument is ``mm_token_type_ids``); pads 0."""
        hf = unwrap(model)
        images = images or {}
        mm = images.get("mm_token_type_ids")
        if mm is None:
            mm = mm_token_type_ids(input_ids, int(hf.config.image_token_id))
        grid = images.get("image_grid_thw") if images.get("pixel_values") is not None else None
        pos, _ = hf.model.get_rope_index(input_ids=input_ids, mm_token_type_ids=mm,
                                         image_grid_thw=grid, attention_mask=attention_mask)
        return pos

    def baseline(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                 images: dict[str, Tensor] | None, **image_kw: Any) -> Baseline:
        """(B, L) ids -> the embeddings and (3, B, L) positions HF's forward builds. Without
        images the tower runs on ``dummy_images`` and enters as ``+ 0 * features`` (the same
        modules on every rank; values unchanged), as for LLaVA."""
        hf = unwrap(model)
        if images is not None and images.get("pixel_values") is not None \
                and images.get("image_grid_thw") is None:
            raise ValueError("Qwen2.5-VL: the batch has pixel_values but no image_grid_thw; "
                             "collate them from the processor's output (batch['image_grid_thw'])")
        embeds = hf.get_input_embeddings()(input_ids)  # (B, L, d)
        placeholders = self.host_mask(hf, input_ids, images)  # (B, L)
        positions = self.rope_positions(hf, input_ids, attention_mask, images)
        if images is None or images.get("pixel_values") is None:
            n_tokens = int(placeholders.sum())
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but pixel_values is None")
            feats = self.features(hf, self.dummy_images(hf, embeds), embeds, **image_kw)
            return Baseline(embeds + (feats * 0).sum(), placeholders, positions)
        feats = self.features(hf, images, embeds, **image_kw)
        embeds = _place(embeds, placeholders, feats, int(images["image_grid_thw"].shape[0]))
        return Baseline(embeds, placeholders, positions)

    def positions(self, base: Baseline, out: Regrouped) -> Tensor:
        """(3, B, L') position ids of the regrouped sequence: ``map_positions`` (module doc)."""
        if base.position_ids is None:
            raise ValueError("QwenVLFamily.positions: the baseline has no position ids; build "
                             "it with QwenVLFamily.baseline")
        return map_positions(base.position_ids, out)

    def generate(self, model: nn.Module, out: Regrouped, positions: Tensor, **gen_kwargs: Any
                 ) -> Tensor:
        """New tokens (B, T_new) from the regrouped (left-padded) prompt with explicit
        positions: HF's generate slices them at prefill and extends them by ``last + 1`` on all
        three axes per decode step (``_update_model_kwargs_for_generation``). The last column
        of a left-padded prompt is a real token whose triple is the last original's (rule in
        the module doc), so decoding continues exactly where the unanchored prompt's would."""
        if positions.dim() != 3 or positions.shape[0] != 3:
            raise ValueError(f"QwenVLFamily.generate: positions must be (3, B, L'), got "
                             f"{tuple(positions.shape)}")
        if (out.attention_mask[:, -1] == 0).any():
            raise ValueError("QwenVLFamily.generate: the regrouped prompt must be left-padded")
        return model.generate(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask,
                              position_ids=positions, **gen_kwargs)
