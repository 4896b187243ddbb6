"""lmms-eval model plugin: run an exported anchored checkpoint through the standard harness.

An exported checkpoint is what ``attanchor export`` writes (``train.export``): a merged / full
model directory of any supported family (LLaVA, LLaVA-NeXT, Qwen2.5-VL) or an adapter export
(``adapter_config.json``, its base loaded from ``base_model_name_or_path``), with the processor
and ``anchor_config.json`` (``AnchorConfig.to_dict()``) beside it and, when the run recorded
them, its ``render_config.json`` settings (chat template, candidate scope). The plugin wraps the
model in ``AnchoredVLM`` so every prompt is regrouped exactly as in training, and renders every
prompt through the training ``Renderer`` (``attanchor.data.render``): the same template pieces,
the same candidate rule, the same image path (each request image is written losslessly as PNG
and read back by the loader training uses), the same collate.

Use it from the command line (needs the entry point below in the installed package's metadata):
    python -m lmms_eval --model anchored_llava --model_args pretrained=DIR,threshold=0.14 \\
        --tasks pope --batch_size 4
or from Python: ``register_with_lmms_eval()`` then ``simple_evaluate(model="anchored_llava", ...)``,
or pass an ``AnchoredLlava(pretrained=DIR)`` instance as ``model``.
Entry point (pyproject): [project.entry-points."lmms_eval.models"]
    anchored_llava = "attanchor.eval.lmms_plugin:lmms_manifest"

Candidates (the tokens that may become anchors) of a harness prompt: the Renderer's rule for
a single user turn, i.e. the tokens of the user message's text, except image tokens and special
tokens (shared/METHOD.md). Chat-template text (role markers, system prompt) and padding are
never candidates (nor are words the tokenizer maps to a special unknown token).

The functions here need no lmms-eval; ``AnchoredLlava`` does, and raises a clear ImportError
without it. lmms-eval 0.7.3 declares torchvision (whose PyPI wheel fails next to a CPU torch and
then breaks ``transformers.LlavaProcessor``) and pins wandb==0.25.0, so install it as
    pip install torch==<your torch> loguru sacrebleu evaluate pytz tenacity pytablewriter
    pip install --no-deps lmms-eval==0.7.3
which is enough for the harness, its CLI and tasks with local data (some tasks need more).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from attanchor.anchoring.config import AnchorConfig
from attanchor.anchoring.model import AnchoredVLM
from attanchor.eval.device import place_model, resolve_device

IMAGE_PLACEHOLDER = "<image>"
_NONE_STRINGS = {"none", "null", ""}
_OPTIONAL_FIELDS = ("threshold", "top_fraction", "max_anchors")


def load_anchored_checkpoint(path: str | Path, *, device: str | torch.device = "cpu",
                             dtype: str | torch.dtype = "auto",
                             **anchor_overrides: Any) -> tuple[AnchoredVLM, Any]:
    """Load an exported anchored checkpoint: (AnchoredVLM in eval mode on `device`, processor).

    ``device``: ``auto | cpu | cuda | cuda:K`` (``attanchor.eval.device.resolve_device``);
    ``dtype="auto"`` keeps the dtype the export was saved in (bf16 stays bf16).

    `anchor_overrides` replace fields of the saved ``anchor_config.json`` (strategy, threshold,
    top_fraction, max_anchors, pause_tokens, scope, seed); the strings "none"/"null" stand for
    None in threshold, top_fraction and max_anchors (command-line model_args are strings).
    """
    from attanchor.train.export import load_exported

    root = Path(path)
    cfg_file = root / "anchor_config.json"
    if not (root / "config.json").is_file() and not (root / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{root} holds no config.json (nor adapter_config.json): not "
                                "an exported model directory (write one with `attanchor export`)")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: export the checkpoint with "
                                "`attanchor export`, or write AnchorConfig(...).to_dict() there "
                                "(strategy 'none' for a plain LLaVA)")
    saved = json.loads(cfg_file.read_text())
    for key, value in anchor_overrides.items():
        if key in _OPTIONAL_FIELDS and isinstance(value, str) and value.lower() in _NONE_STRINGS:
            value = None
        saved[key] = value
    config = AnchorConfig.from_dict(saved)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected 'auto' or a torch dtype name such as "
                         "'float32', 'bfloat16', 'float16'")
    target = resolve_device(device)  # before loading: a bad device fails at once
    model, processor, _ = load_exported(root, dtype=dtype)  # merged, full or adapter export
    vlm = place_model(AnchoredVLM(model, config), target)
    vlm.eval()
    return vlm, processor


def renderer_for(path: str | Path, processor: Any, config: AnchorConfig) -> Any:
    """The training ``Renderer`` of an export: its ``render_config.json`` template and scope
    when it has one, else the model's own chat template and the anchor config's scope."""
    from attanchor.data.render import Renderer
    from attanchor.train.export import read_render_config

    settings = read_render_config(path)
    template = settings.template if settings is not None else None
    scope = settings.scope if settings is not None else config.scope
    return Renderer(processor, template=template, scope=scope)


def _as_renderer(processor_or_renderer: Any) -> Any:
    from attanchor.data.render import Renderer

    if isinstance(processor_or_renderer, Renderer):
        return processor_or_renderer
    return Renderer(processor_or_renderer)  # the model's own chat template


def _user_content(context: str, n_images: int) -> str:
    """The user message: one "<image>\n" per image in front when the context has no
    placeholder (lmms-eval prompts usually have none); otherwise its placeholders must match
    the images."""
    if IMAGE_PLACEHOLDER in context:
        if context.count(IMAGE_PLACEHOLDER) != n_images:
            raise ValueError(f"prompt has {context.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                             f"placeholders but the request brings {n_images} images: {context!r}")
        return context
    return f"{IMAGE_PLACEHOLDER}\n" * n_images + context


def prompt_inputs(processor: Any, contexts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                  continuations: Sequence[str] | None = None) -> dict[str, Any]:
    """Render single-turn prompts through the training ``Renderer`` and collate them
    left-padded (``AnchoredVLM.generate`` requires it).

    ``processor``: a ``Renderer`` (the plugin's, from the export's render settings) or a
    processor (then a ``Renderer`` with the model's own chat template). Returns collate's batch
    (``attanchor.data.collate``): input_ids (B, L) long, attention_mask (B, L) long,
    pixel_values and the family's size tensors (``image_sizes`` / ``image_grid_thw``),
    candidate_mask (B, L) bool (the Renderer's candidates). With ``continuations`` each is the
    assistant answer (leading blanks dropped: the template's assistant prefix has its own) and
    "continuation_mask" (B, L) bool marks its tokens (not the end-of-turn token).

    Example (tiny model): "<image>\\nIs there a red shape?" -> "USER: <image>x64\\nis there a
    red shape ? ASSISTANT:" with candidates exactly at "is there a red shape ?".
    """
    from attanchor.data.collate import collate
    from attanchor.data.formats import Conversation, Turn
    from attanchor.data.render import Renderer

    if len(contexts) != len(images):
        raise ValueError(f"{len(contexts)} prompts but {len(images)} image lists")
    if continuations is not None and len(continuations) != len(contexts):
        raise ValueError(f"{len(contexts)} prompts but {len(continuations)} continuations")
    base = _as_renderer(processor)
    samples = []
    with tempfile.TemporaryDirectory(prefix="attanchor-lmms-") as tmp:
        # The same image path as training: decoded by the data loader from a lossless file.
        renderer = Renderer(base.processor, template=base.template, scope=base.scope,
                            image_root=tmp)
        for i, (context, imgs) in enumerate(zip(contexts, images, strict=True)):
            if not imgs or not all(isinstance(im, Image.Image) for im in imgs):
                raise ValueError(f"request {i}: expected one or more PIL images, got {imgs!r} "
                                 "(video and text-only requests are not supported)")
            names = [f"{i}-{j}.png" for j in range(len(imgs))]
            for name, im in zip(names, imgs, strict=True):
                im.convert("RGB").save(Path(tmp) / name)
            turns = [Turn("user", _user_content(context, len(imgs)))]
            if continuations is not None:
                turns.append(Turn("assistant", continuations[i].lstrip()))
            conv = Conversation(f"request-{i}", turns, names)
            samples.append(renderer(conv, for_generation=continuations is None))
    tok = base.tokenizer
    batch = collate(samples, tok.pad_token_id, padding_side="left")
    if continuations is not None:
        special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
        labels = batch.pop("labels")
        batch["continuation_mask"] = (labels != -100) & ~torch.isin(labels, special)
    else:
        batch.pop("labels")
    return batch


def _model_inputs(vlm: AnchoredVLM, batch: dict[str, Any]) -> tuple[list[Tensor], dict]:
    """(input_ids, pixel_values, attention_mask) and the family's other image keys, on the
    model's device (pixels in its dtype)."""
    device = next(vlm.parameters()).device
    dtype = next(vlm.model.parameters()).dtype
    pixels = batch["pixel_values"]
    pixels = pixels.to(device, dtype) if pixels.is_floating_point() else pixels.to(device)
    extra = {k: batch[k].to(device) for k in vlm.family.image_keys
             if k != "pixel_values" and batch.get(k) is not None}
    return [batch["input_ids"].to(device), pixels, batch["attention_mask"].to(device)], extra


def _generation_settings(gen_kwargs: dict[str, Any], default_max_new_tokens: int,
                         tokenizer: Any) -> tuple[dict[str, Any], list[str]]:
    """lmms-eval generation_kwargs -> (HF generate kwargs, stop strings)."""
    kw = dict(gen_kwargs)
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    temperature = float(kw.pop("temperature", 0) or 0)
    do_sample = bool(kw.pop("do_sample", False)) or temperature > 0
    top_p = kw.pop("top_p", None)
    hf = {"max_new_tokens": int(kw.pop("max_new_tokens", default_max_new_tokens)),
          "num_beams": int(kw.pop("num_beams", 1) or 1), "do_sample": do_sample,
          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        hf["temperature"] = temperature if temperature > 0 else 1.0
        if top_p is not None:
            hf["top_p"] = float(top_p)
    hf.update(kw)  # anything else the task asks for goes to HF generate as it is
    return hf, until


def _cut(text: str, until: Sequence[str]) -> str:
    """Text before the first stop string (lm-eval's convention), stripped."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


@torch.no_grad()
def generate_answers(vlm: AnchoredVLM, processor: Any, contexts: Sequence[str],
                     images: Sequence[Sequence[Image.Image]], gen_kwargs: dict[str, Any],
                     default_max_new_tokens: int = 128) -> list[str]:
    """Answer a batch of single-turn prompts with anchored generation; one string each.
    ``processor``: the plugin's ``Renderer`` or a processor (``prompt_inputs``)."""
    inputs = prompt_inputs(processor, contexts, images)
    hf_kwargs, until = _generation_settings(gen_kwargs, default_max_new_tokens,
                                            processor.tokenizer)
    args, extra = _model_inputs(vlm, inputs)
    new = vlm.generate(*args, candidate_mask=inputs["candidate_mask"].to(args[0].device),
                       **extra, **hf_kwargs)
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    return [_cut(t, until) for t in texts]


@torch.no_grad()
def continuation_loglikelihood(vlm: AnchoredVLM, processor: Any, context: str,
                               continuation: str, images: Sequence[Image.Image]
                               ) -> tuple[float, bool]:
    """(sum of log p(continuation tokens | prompt), whether greedy decoding yields them).

    The prompt is regrouped as in generation; the continuation follows the generation prompt
    and is never a candidate. A token that straddles the prompt/continuation boundary counts
    as continuation.
    """
    if not continuation.strip():
        raise ValueError(f"continuation {continuation!r} produced no tokens")
    inputs = prompt_inputs(processor, [context], [images], continuations=[continuation])
    mask = inputs["continuation_mask"]
    if not mask.any():
        raise ValueError(f"continuation {continuation!r} produced no tokens")
    labels = torch.where(mask, inputs["input_ids"], torch.full_like(inputs["input_ids"], -100))
    args, extra = _model_inputs(vlm, inputs)
    out = vlm(*args, labels=labels.to(args[0].device),
              candidate_mask=inputs["candidate_mask"].to(args[0].device), **extra)
    if vlm.config.active:  # logits are over the regrouped sequence: use its labels
        labels = vlm.last_regrouped.labels
    logits = out.logits[:, :-1].float()  # (1, L'-1, V) predicts positions 1..L'-1
    target = labels[:, 1:].to(logits.device)
    keep = target != -100
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, target.clamp(min=0)[..., None])[..., 0]  # (1, L'-1)
    total = float(picked[keep].sum())
    greedy = bool((logits.argmax(-1)[keep] == target[keep]).all())
    if not math.isfinite(total):
        raise ValueError(f"log-likelihood of {continuation!r} is not finite ({total})")
    return total, greedy


def lmms_manifest() -> Any:
    """lmms-eval's registration payload (the "lmms_eval.models" entry point's target)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="anchored_llava",
                         simple_class_path="attanchor.eval.lmms_plugin.AnchoredLlava",
                         aliases=("attanchor",))


def register_with_lmms_eval() -> None:
    """Register "anchored_llava" (alias "attanchor") in a running lmms-eval, without the
    entry point (for Python use and tests)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(lmms_manifest(), overwrite=True)


try:
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError as _err:  # lmms-eval is optional: only AnchoredLlava needs it
    _LmmsBase = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None


if _LmmsBase is not None:

    class AnchoredLlava(_LmmsBase):
        """lmms-eval model "anchored_llava": an exported anchored LLaVA checkpoint.

        model_args: pretrained (the checkpoint directory), device (auto | cpu | cuda | cuda:K;
        default auto: cuda:LOCAL_RANK when CUDA is available, else cpu), dtype ("auto": as
        saved | torch dtype name), batch_size, max_new_tokens
        (when a task sets none), and any AnchorConfig field as an override (strategy,
        threshold, top_fraction, max_anchors, pause_tokens, scope, seed).
        Supports generate_until and loglikelihood on image tasks. Under torchrun the harness
        splits the requests by rank itself (it sets rank and world_size on the model), and
        device=auto gives each rank its own GPU (cuda:LOCAL_RANK); ``device`` is the property
        the harness reads for its collectives.
        """

        is_simple = True

        def __init__(self, pretrained: str, device: str | None = "auto", dtype: str = "auto",
                     batch_size: int | str = 1, max_new_tokens: int = 128,
                     max_batch_size: int | None = None, **anchor_overrides: Any) -> None:
            super().__init__()
            del max_batch_size  # the harness passes it; batches here are fixed-size
            if not str(batch_size).isdigit() or int(batch_size) < 1:
                raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
            self.batch_size = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
            self.vlm, self.processor = load_anchored_checkpoint(
                pretrained, device=device, dtype=dtype, **anchor_overrides)
            # Prompts render as in training: the export's template and candidate scope.
            self.renderer = renderer_for(pretrained, self.processor, self.vlm.config)
            self.pretrained = str(pretrained)

        @property
        def device(self) -> torch.device:
            """Where the model runs (the harness puts its count tensors there)."""
            return next(self.vlm.parameters()).device

        def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            return list(visuals) if isinstance(visuals, list | tuple) else [visuals]

        def generate_until(self, requests: list) -> list[str]:
            """Answers in request order; batches group requests with equal generation_kwargs."""
            answers: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                key = json.dumps(req.args[1], sort_keys=True, default=str)
                groups.setdefault(key, []).append(i)
            for idx in groups.values():
                for k in range(0, len(idx), self.batch_size):
                    chunk = idx[k:k + self.batch_size]
                    args = [requests[i].args for i in chunk]
                    contexts = [a[0] for a in args]
                    images = [self._visuals(a[2], a[3], a[4], a[5]) for a in args]
                    outs = generate_answers(self.vlm, self.renderer, contexts, images,
                                            dict(args[0][1]), self.max_new_tokens)
                    for i, text in zip(chunk, outs, strict=True):
                        answers[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
            return answers  # type: ignore[return-value]

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            results = []
            for req in requests:
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                images = self._visuals(doc_to_visual, doc_id, task, split)
                results.append(continuation_loglikelihood(self.vlm, self.renderer, context,
                                                          continuation, images))
            return results

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("anchored_llava answers single-turn requests only "
                                      "(generate_until, loglikelihood)")

else:

    def __getattr__(name: str) -> Any:
        if name == "AnchoredLlava":
            raise ImportError(
                "attanchor.eval.lmms_plugin.AnchoredLlava needs lmms-eval, which is not "
                f"importable here ({_IMPORT_ERROR}). Install it without its torchvision/CUDA "
                "pins, as the docstring of attanchor/eval/lmms_plugin.py says"
            ) from _IMPORT_ERROR
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
