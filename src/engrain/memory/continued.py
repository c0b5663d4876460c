"""Continuing a saved prefix or memory layer: what ``engrain update`` does beyond loading a LoRA's tensors.

Both kinds are attached afresh by the trainer (a prefix read from today's corpus, a memory layer with its slots'
IDF measured on general text), so an update first puts the saved memory back in place of the fresh one:

- **prefix**: the saved keys and values (its sink token included) replace the ones read from the corpus; the
  shape must match (``train.options.prefix.length``), since the optimizer already holds the parameters.
- **memory layer**: the saved lookup and values replace the fresh ones, and the IDF is measured again on the
  general text *and* the documents learned before. A slot the earlier documents read often then scores low, so
  the new documents' batches write elsewhere: the sparse-memory recipe's answer to overwriting what was learned
  (Lin et al. 2025, where the background is what the model must keep). The rehearsed earlier items still update
  the slots they read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import EngrainError


def continue_prefix(module, folder: Path) -> None:
    """The saved prefix in ``folder`` copied into the freshly attached ``module`` (a PrefixLM)."""
    from safetensors.torch import load_file

    from .prefix import WEIGHTS_FILE

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise EngrainError(f"No prefix weights in {folder} (missing {WEIGHTS_FILE}).", hint="Train the memory again.")
    saved = load_file(str(path))
    keys, values = module.prefix_kv()
    if saved["keys"].shape != keys.shape or saved["values"].shape != values.shape:
        raise EngrainError(f"The prefix in {folder} has {saved['keys'].shape[2]} positions; the recipe attaches "
                           f"{keys.shape[2]}.", hint="Set train.options.prefix.length back to what the memory was "
                                                     "trained with, or train it again with --force.")
    n_sink = module.sink_keys.shape[2]
    with torch.no_grad():
        for target, name in ((module.sink_keys, "keys"), (module.sink_values, "values")):
            target.copy_(saved[name][:, :, :n_sink])
        for target, name in ((module.keys, "keys"), (module.values, "values")):
            target.copy_(saved[name][:, :, n_sink:])


def continue_memory_layer(module, folder: Path, tokenizer, learned_texts: list[str]) -> int:
    """The saved memory layer in ``folder`` copied into the freshly attached ``module``, and each slot's IDF
    measured against the general text plus ``learned_texts`` (the documents learned before). Returns the number
    of background tokens read."""
    from safetensors.torch import load_file

    from .memory_layer import (CONFIG_FILE, WEIGHTS_FILE, background_ids, copy_saved, measure_idf, memories)

    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise EngrainError(f"No memory-layer weights in {folder} (missing {WEIGHTS_FILE}).",
                           hint="Train the memory again.")
    saved_layers = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("layers")
    mems = memories(module)
    if saved_layers != [m.layer_idx for m in mems]:
        raise EngrainError(f"The memory layer in {folder} sits in blocks {saved_layers}; the recipe attaches it to "
                           f"{[m.layer_idx for m in mems]}.", hint="Train it again with --force.")
    copy_saved(mems, load_file(str(folder / WEIGHTS_FILE)), folder)
    ids = background_ids(tokenizer)
    for text in learned_texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module.engrain_background_tokens = measure_idf(module, mems, ids)
    module.train(was_training)
    return module.engrain_background_tokens
