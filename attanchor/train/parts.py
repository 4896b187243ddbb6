"""Where each supported model family keeps its parts, for loading and choosing what trains.

A checkpoint's ``config.json`` names its ``model_type``; that picks the model class and the
module names ``build.configure_trainable`` freezes, adapts or trains (plain ``if``/``elif``,
the same three families as ``anchoring.family``):

  ===========  ==================================  =========================  ==============
  model_type   class                               projector (+ loose params)  vision tower
  ===========  ==================================  =========================  ==============
  llava        LlavaForConditionalGeneration       model.multi_modal_projector model.vision_tower
  llava_next   LlavaNextForConditionalGeneration   model.multi_modal_projector model.vision_tower
               (+ ``model.image_newline``, one d-vector trained with the projector)
  qwen2_5_vl   Qwen2_5_VLForConditionalGeneration  model.visual.merger         model.visual
               (the merger sits inside ``model.visual``: the tower is its patch embedding
               and blocks)
  ===========  ==================================  =========================  ==============

Example: ``parts_for("llava_next").projector_params == ("model.image_newline",)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

MODEL_TYPES = ("llava", "llava_next", "qwen2_5_vl")


@dataclass(frozen=True)
class Parts:
    """Module names relative to the Hugging Face model (``LlavaForConditionalGeneration``...).

    ``projector``: the module that maps vision features into the LM (LoRA targets its Linear
    layers, ``projector_mode="lora"``). ``projector_params``: loose parameters trained fully
    whenever the projector trains (no Linear to adapt). ``vision_tower``: the modules frozen
    unless ``freeze_vision_tower=False`` (disjoint from the projector). ``language_model``.
    ``qlora_skip``: prefixes bitsandbytes keeps in float (tower, projector, LM head).
    """

    model_type: str
    class_name: str
    projector: str
    projector_params: tuple[str, ...]
    vision_tower: tuple[str, ...]
    qlora_skip: tuple[str, ...]
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"


def parts_for(model_type: str) -> Parts:
    """The parts of a family by its config's ``model_type``; ValueError naming the supported
    ones for any other."""
    llava_skip = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    if model_type == "llava":
        return Parts("llava", "LlavaForConditionalGeneration", "model.multi_modal_projector",
                     (), ("model.vision_tower",), llava_skip)
    if model_type == "llava_next":
        return Parts("llava_next", "LlavaNextForConditionalGeneration",
                     "model.multi_modal_projector", ("model.image_newline",),
                     ("model.vision_tower",), llava_skip)
    if model_type == "qwen2_5_vl":
        return Parts("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "model.visual.merger",
                     (), ("model.visual.patch_embed", "model.visual.blocks"),
                     ("model.visual", "lm_head"))
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {MODEL_TYPES} "
                     "(LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL checkpoints)")


def model_class(model_type: str) -> type:
    """The transformers class that loads a checkpoint of ``model_type``."""
    import transformers

    return getattr(transformers, parts_for(model_type).class_name)


def model_type_of(model_path: str, trust_remote_code: bool = False) -> str:
    """The ``model_type`` a checkpoint's config records (read with ``AutoConfig``)."""
    from transformers import AutoConfig

    return str(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
               .model_type)


def parts_of(model: nn.Module) -> Parts:
    """The parts of a loaded (unwrapped) Hugging Face model, by its config; TypeError for a
    model of another class than its family's (e.g. a bare language model)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise TypeError(f"expected a model of one of {MODEL_TYPES} from load_model, got "
                        f"{type(model).__name__} (model_type {model_type!r})")
    parts = parts_for(model_type)
    if type(model).__name__ != parts.class_name:
        raise TypeError(f"expected a {parts.class_name} from load_model, got "
                        f"{type(model).__name__} (call it once, on the unwrapped model)")
    return parts
