"""The lmms-eval plugin on LLaVA-NeXT and Qwen2.5-VL exports, adapter and merged: prompts from
the training Renderer, the family's image keys through generation, a local harness request."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from attanchor.anchoring import AnchorConfig
from attanchor.eval import lmms_plugin as lp
from attanchor.train.build import configure_trainable, load_model
from attanchor.train.export import export_model, load_processor

VOCAB = ["user", ":", "assistant", "is", "there", "a", "red", "blue", "shape", "?", "yes", "no"]
# Different sizes: NeXT picks different tile grids, Qwen different patch grids.
RED, BLUE = Image.new("RGB", (80, 40), "red"), Image.new("RGB", (32, 32), "blue")


def build(family, out):
    if family == "llava_next":
        from attanchor.data.tiny_next import build_tiny_next
        return build_tiny_next(out, vocab=VOCAB)
    from attanchor.data.tiny_qwen import build_tiny_qwen
    return build_tiny_qwen(out, vocab=VOCAB)


@pytest.fixture(scope="module", params=["llava_next", "qwen2_5_vl"])
def exports(request, tmp_path_factory):
    """(family, adapter export, merged export) of a LoRA model whose adapters are not zero."""
    root = tmp_path_factory.mktemp(request.param)
    base = build(request.param, root / "base")
    peft = configure_trainable(load_model(str(base)), mode="lora", lora_r=4, lora_alpha=8)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    anchor = AnchorConfig(strategy="text_into_image", threshold=-1.0)  # every candidate
    out = {}
    for merge in (False, True):
        out[merge] = export_model(peft, root / f"export-{merge}", merge=merge,
                                  anchor_config=anchor, processor=load_processor(base))
    return request.param, out[False], out[True]


def test_adapter_and_merged_exports_answer_alike(exports):
    family, adapter, merged = exports
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    answers = {}
    for name, path in (("adapter", adapter), ("merged", merged)):
        vlm, proc = lp.load_anchored_checkpoint(path, strategy="none")
        assert type(vlm.model).__name__ == ("PeftModel" if name == "adapter" else {
            "llava_next": "LlavaNextForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family])
        answers[name] = lp.generate_answers(vlm, proc, ["Is there a red shape?", "blue?"],
                                            [[RED], [BLUE]], {"max_new_tokens": 4})
        # strategy none: exactly HF's own generate on the Renderer's batch
        inp = lp.prompt_inputs(proc, ["Is there a red shape?", "blue?"], [[RED], [BLUE]])
        keys = [k for k in vlm.family.image_keys if inp.get(k) is not None]
        ref = vlm.model.generate(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                                 **{k: inp[k] for k in keys}, max_new_tokens=4, do_sample=False)
        want = proc.tokenizer.batch_decode(ref[:, inp["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
        assert answers[name] == [w.strip() for w in want]
    assert answers["adapter"] == answers["merged"]


def test_prompt_inputs_carry_the_family_keys_and_user_candidates(exports):
    family, adapter, _ = exports
    vlm, proc = lp.load_anchored_checkpoint(adapter)
    inp = lp.prompt_inputs(proc, ["Is there a red shape?", "blue?"], [[RED], [BLUE]])
    size_key = {"llava_next": "image_sizes", "qwen2_5_vl": "image_grid_thw"}[family]
    assert inp[size_key].shape[0] == 2
    words = [proc.tokenizer.convert_ids_to_tokens(inp["input_ids"][b][inp["candidate_mask"][b]]
                                                  .tolist()) for b in range(2)]
    assert words == [["is", "there", "a", "red", "shape", "?"], ["blue", "?"]]
    lp.generate_answers(vlm, proc, ["Is there a red shape?", "blue?"], [[RED], [BLUE]],
                        {"max_new_tokens": 2})
    assert vlm.last_anchor_counts.tolist() == [6, 2]  # every candidate anchored (tau -1)


def test_harness_answers_a_local_request(exports):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from attanchor.eval.lmms_plugin import AnchoredLlava

    _, adapter, _ = exports
    model = AnchoredLlava(pretrained=str(adapter), device="cpu", batch_size=2, max_new_tokens=3)
    docs = [{"q": "is there a red shape?", "img": RED}, {"q": "blue?", "img": BLUE}]
    model.task_dict = {"local": {"test": docs}}

    def visual(doc):
        return [doc["img"]]

    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    reqs = [Instance(request_type="generate_until", idx=0,
                     arguments=(d["q"], dict(gen), visual, i, "local", "test"),
                     metadata={"task": "local", "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs)]
    answers = model.generate_until(reqs)
    assert answers == lp.generate_answers(model.vlm, model.renderer, [d["q"] for d in docs],
                                          [[RED], [BLUE]], gen, 3)
    ll_req = Instance(request_type="loglikelihood", idx=0,
                      arguments=(docs[0]["q"], " yes", visual, 0, "local", "test"),
                      metadata={"task": "local", "doc_id": 0, "repeats": 1})
    (ll, greedy), = model.loglikelihood([ll_req])
    assert ll < 0 and isinstance(greedy, bool)
    assert json.loads((adapter / "anchor_config.json").read_text())["threshold"] == -1.0
