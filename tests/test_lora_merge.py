"""A LoRA memory answers with the adapter folded into its own copy of the weights: the same greedy tokens as the
adapter run beside the base layers, at no extra cost per token, and the caller's base model untouched."""

from __future__ import annotations

import json


def test_merged_lora_answers_what_the_adapter_answers(tiny_lm, tmp_path):
    import copy

    import torch

    from engrain.memory.parametric import LoraKind, TrainedMemory, model_fingerprint
    from engrain.models import LM, chat_messages, chat_prompt, generate
    from engrain.workspace import Workspace

    kind = LoraKind()
    ws = Workspace.at(tmp_path / "ws").ensure()
    module = kind.attach(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, {"lora_rank": 4}, ws)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the adapter something to say
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    folder = ws.memory_dir("lora")
    folder.mkdir(parents=True)
    meta = {"kind": "lora", "base_model": tiny_lm.name, "base_fingerprint": model_fingerprint(tiny_lm.model)}
    kind.save(module, folder, meta)
    from engrain.memory.parametric import META_FILE

    (folder / META_FILE).write_text(json.dumps(meta))

    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    memory = TrainedMemory("lora", ws, tiny_lm)
    assert not hasattr(memory.lm.model, "peft_config"), "the answering model is a plain model, adapter folded in"
    assert all(torch.equal(before[k], v) for k, v in tiny_lm.model.state_dict().items())

    adapter = kind.load(copy.deepcopy(tiny_lm.model), tiny_lm.tokenizer, folder)
    prompts = [chat_prompt(tiny_lm.tokenizer, chat_messages(q)) for q in ("Who built the mill?", "Name a colour.")]
    unmerged = generate(LM(adapter, tiny_lm.tokenizer, "adapter", tiny_lm.path, tiny_lm.device), prompts,
                        max_new_tokens=12)
    merged = generate(memory.lm, prompts, max_new_tokens=12)
    base = generate(tiny_lm, prompts, max_new_tokens=12)
    assert [g.text for g in merged] == [g.text for g in unmerged]
    assert [g.text for g in merged] != [g.text for g in base], "the adapter changes the answers"
