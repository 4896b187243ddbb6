"""Generation-based evaluation: batched anchored generation, POPE and VQA metrics, predictions.

POPE files are POPE's own JSONL (``question_id, image, text, label, category``); VQA files are
LLaVA conversations whose first assistant turn is the reference answer. Each question becomes a
one-turn conversation rendered for generation, so the candidate mask (the question's words) is
built exactly as in training, and the anchored model regroups the prompt the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from attanchor.anchoring import AnchoredVLM
from attanchor.data.collate import collate
from attanchor.data.formats import IMAGE_PLACEHOLDER, Conversation, Turn, read_records
from attanchor.data.render import Renderer
from attanchor.eval.metrics import parse_yes_no, pope_metrics, vqa_accuracy
from attanchor.eval.ranks import barrier, eval_world, gather_in_order, is_writer, shard_bounds

TASKS = ("pope", "vqa")


@dataclass(frozen=True)
class Item:
    """One question: the prompt as a conversation, its reference answer and category."""

    conversation: Conversation
    answer: str | list[str]
    category: str | None = None


def read_pope(path: str | Path) -> list[Item]:
    """POPE JSONL -> items. A record without the POPE fields raises, naming its line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
            if missing:
                raise ValueError(f"{path}:{line_no}: POPE record lacks {missing}; expected "
                                 "question_id, image, text, label[, category]")
            conv = Conversation(id=str(rec["question_id"]),
                                turns=[Turn("user", f"{IMAGE_PLACEHOLDER}\n{rec['text']}")],
                                images=[rec["image"]])
            items.append(Item(conv, str(rec["label"]).lower(), rec.get("category")))
    return items


def read_vqa(path: str | Path, format: str = "llava") -> list[Item]:
    """Conversations -> items: the first user turn is the question, the first assistant turn
    (or a record's ``answers`` list of human answers) the reference."""
    items = []
    for conv in read_records(path, format):
        user, answer = conv.turns[0], conv.turns[1]
        if user.role == "system":
            user, answer = conv.turns[1], conv.turns[2]
        n_images = user.text.count(IMAGE_PLACEHOLDER)
        prompt = Conversation(id=conv.id, turns=[Turn("user", user.text)],
                              images=conv.images[:n_images])
        items.append(Item(prompt, answer.text))
    return items


def batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


@torch.no_grad()
def generate_answers(anchored: AnchoredVLM, renderer: Renderer, items: Sequence[Item], *,
                     batch_size: int = 16, max_new_tokens: int = 8,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Greedy answers for every item, with the anchors each prompt received.

    Batches of ``batch_size`` prompts (left-padded) are generated on the model's device (the
    device of its input embeddings), pixel values cast to the model's dtype.
    Returns one dict per item: ``id``, ``prediction`` (decoded, special tokens dropped),
    ``anchors`` (copies inserted into its prompt), ``prompt`` (the rendered prompt as the
    model read it, see ``prompt_text``).
    """
    tok = renderer.tokenizer
    table = anchored.model.get_input_embeddings().weight
    device, dtype = table.device, table.dtype
    out: list[dict[str, Any]] = []
    for chunk in tqdm(list(batches(items, batch_size)), desc="eval", disable=not progress):
        samples = [renderer(it.conversation, for_generation=True) for it in chunk]
        batch = collate(samples, tok.pad_token_id, padding_side="left")
        pv = batch["pixel_values"]
        # The family's other image keys: image_sizes (LLaVA-NeXT), image_grid_thw (Qwen).
        extra = {k: batch[k].to(device) for k in anchored.family.image_keys
                 if k != "pixel_values" and batch.get(k) is not None}
        new = anchored.generate(
            batch["input_ids"].to(device),
            None if pv is None else pv.to(device, dtype),
            batch["attention_mask"].to(device),
            candidate_mask=batch["candidate_mask"].to(device),
            # The random control's placements key on the record, not on its row in the batch.
            sample_index=batch["sample_index"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
        texts = tok.batch_decode(new, skip_special_tokens=True)
        counts = anchored.last_anchor_counts.tolist()
        for it, sample, text, n in zip(chunk, samples, texts, counts):
            out.append({"id": it.conversation.id, "prediction": text.strip(), "anchors": int(n),
                        "prompt": prompt_text(tok, sample.input_ids, anchored.image_token_id)})
    return out


def prompt_text(tokenizer: Any, input_ids: torch.Tensor | Sequence[int], image_token_id: int
                ) -> str:
    """The prompt's tokens decoded with special tokens kept, each run of image tokens shown
    as one image token (a 576-token run would drown the text). Shows which template
    rendered the prompt, e.g. ``<s>USER: <image>\nis there a circle ? ASSISTANT:``."""
    ids = [int(i) for i in input_ids]
    kept = [t for k, t in enumerate(ids) if t != image_token_id or k == 0
            or ids[k - 1] != image_token_id]
    return tokenizer.decode(kept, skip_special_tokens=False)


def score(task: str, items: Sequence[Item], predictions: Sequence[dict[str, Any]]
          ) -> dict[str, Any]:
    """Metrics for ``task``: POPE's (accuracy, precision, recall, F1, yes-ratio, per category)
    or VQA accuracy; both with the mean number of anchors per prompt."""
    preds = [p["prediction"] for p in predictions]
    anchors = sum(p["anchors"] for p in predictions) / max(len(predictions), 1)
    if task == "pope":
        cats = [it.category for it in items]
        metrics = pope_metrics(preds, [it.answer for it in items],
                               cats if all(c is not None for c in cats) else None)
    elif task == "vqa":
        metrics = {"accuracy": vqa_accuracy(preds, [it.answer for it in items]),
                   "n": len(items)}
    else:
        raise ValueError(f"task={task!r}: allowed are {TASKS}")
    metrics["anchors_per_prompt"] = anchors
    return metrics


def evaluate(anchored: AnchoredVLM, processor: Any, data: str | Path, task: str, *,
             image_root: str | Path, out_dir: str | Path | None = None,
             template: str | None = None, batch_size: int = 16, max_new_tokens: int = 8,
             limit: int | None = None, format: str = "llava", progress: bool = True,
             scope: str | None = None) -> dict[str, Any]:
    """Evaluate on a POPE or VQA file; write ``predictions.jsonl`` and ``metrics.json`` to
    ``out_dir`` when given; return the metrics (the same on every rank).

    Prompts are rendered with ``template`` (None: the model's own chat template) and candidate
    ``scope`` (None: ``anchored.config.scope``). Under several processes (``ranks.eval_world``)
    each rank answers its contiguous shard of the items, the answers are gathered in the
    original order, metrics are computed from all of them, and only rank zero writes.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed are {TASKS}")
    items = read_pope(data) if task == "pope" else read_vqa(data, format)
    items = items[:limit] if limit else items
    renderer = Renderer(processor, template=template, scope=scope or anchored.config.scope,
                        image_root=image_root)
    rank, world = eval_world()
    start, end = shard_bounds(len(items), rank, world)
    local = generate_answers(anchored, renderer, items[start:end], batch_size=batch_size,
                             max_new_tokens=max_new_tokens, progress=progress and rank == 0)
    predictions = gather_in_order(local, world)
    got = [p["id"] for p in predictions]
    if got != [it.conversation.id for it in items]:  # every item once, in the file's order
        raise RuntimeError(f"gathered {len(got)} predictions for {len(items)} items over "
                           f"{world} ranks, not in the items' order: ranks disagree about "
                           f"the items of {data} (same file and --limit on every rank?)")
    metrics = score(task, items, predictions)
    if out_dir is not None and is_writer(rank):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for it, p in zip(items, predictions):
                ref = it.answer
                row = {**p, "answer": ref, "category": it.category}
                if task == "pope":
                    row["parsed"] = parse_yes_no(p["prediction"])
                f.write(json.dumps(row) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    barrier(world)  # the files exist for every rank once evaluate returns
    return metrics
