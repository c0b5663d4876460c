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
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


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


def vllm_command(ws: Workspace, model_spec: str | None = None, *, port: int = 8000) -> dict:
    """The ``vllm serve`` command line that serves the workspace's LoRA memories as they are, beside the base model.

    vLLM reads PEFT adapter folders directly (``--enable-lora --lora-modules name=path``), so nothing is converted;
    the model names match ``engrain serve``'s (``<workspace>:<memory>``), so clients switch servers by URL only.
    Retrieval (``rag``, ``X+rag``) and the prefix/memory-layer memories stay with ``engrain serve``.
    """
    import json
    import shlex

    from .memory.parametric import META_FILE, read_meta
    from .serve.engine import workspace_model_prefix

    prefix = workspace_model_prefix(ws)
    adapters, bases, ranks = [], set(), []
    folders = sorted(ws.memories_dir.iterdir()) if ws.memories_dir.is_dir() else []
    for folder in folders:
        if not (folder / META_FILE).is_file() or not (folder / "adapter_config.json").is_file():
            continue
        meta = read_meta(folder)
        if meta.get("kind", folder.name) != "lora":
            continue
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        adapters.append({"name": f"{prefix}:{folder.name}", "path": str(folder)})
        ranks.append(int(cfg.get("r", 16)))
        bases.add(meta.get("base_model_path") or meta.get("base_model"))
    if not adapters:
        raise EngrainError(f"No trained LoRA memory in {ws.memories_dir}.",
                           hint="Train one first: engrain train -w WORKSPACE --memory lora")
    if model_spec:
        from .models import resolve_model

        base = resolve_model(model_spec)[1]
    elif len(bases) == 1:
        base = bases.pop()
    else:
        raise EngrainError(f"The LoRA memories were trained on different models ({', '.join(map(str, bases))}).",
                           hint="Name the base model with --model; only adapters trained on it will load.")
    # vLLM accepts only some values for --max-lora-rank: the smallest that holds every adapter.
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= max(ranks)), max(ranks))
    cmd = ["vllm", "serve", str(base), "--served-model-name", f"{prefix}:base", "--port", str(port),
           "--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(len(adapters)),
           "--lora-modules", *[f"{a['name']}={a['path']}" for a in adapters]]
    return {"command": shlex.join(cmd), "argv": cmd, "base_model": str(base), "adapters": adapters}
