"""Export a trained memory as a plain Hugging Face model folder (``engrain export --merge``).

LoRA adapters are merged into the base weights, so any tool that loads a Hugging Face model (vLLM, llama.cpp's
converter, transformers) serves the result without PEFT. The tokenizer, and with it the chat template, is saved
alongside so the merged model is prompted exactly as engrain prompts it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import EngrainError
from .workspace import Workspace

MERGEABLE = ("lora", "full")


def export_merged(ws: Workspace, memory: str, out: Path, model_spec: str | None = None) -> dict:
    from .memory.parametric import get_kind, read_meta
    from .models import load_model

    folder = ws.memory_dir(memory)
    meta = read_meta(folder)
    kind_name = meta.get("kind", memory)
    if kind_name not in MERGEABLE:
        raise EngrainError(f"A '{kind_name}' memory changes the model's structure and cannot be merged into "
                           "plain Hugging Face weights.",
                           hint=f"Export one of: {', '.join(MERGEABLE)}; serve the others with engrain serve.")
    # The model it was trained on, unless the user names another (the load then checks that it fits).
    trained_on = meta.get("base_model_path")
    if not trained_on or not Path(trained_on).exists():
        trained_on = meta.get("base_model")
    lm = load_model(model_spec or trained_on, device="cpu", dtype="float32")
    module = get_kind(kind_name).load(lm.model, lm.tokenizer, folder)
    merged = module.merge_and_unload() if kind_name == "lora" else module
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise EngrainError(f"{out} exists and is not empty.", hint="Choose a new --out folder or delete that one.")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    lm.tokenizer.save_pretrained(str(tmp))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {"out": str(out), "memory": memory, "kind": kind_name, "base_model": meta.get("base_model")}
