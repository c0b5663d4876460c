"""Every kind of memory by name: the one list the CLI, the config, comparisons, the trainer and the server read.

``registry.open_memory`` turns these names into Memory objects. The names live here, apart from it, because this
module imports nothing heavy: the config checks names with it without importing the memories (which read the config).

Hybrids are written ``X+rag``: a trained memory's model reading retrieved chunks. An old name (``memory``, the
memory layer before it was called ``memory_layer``) is still accepted, with a one-line notice on stderr.
"""

from __future__ import annotations

from ..progress import note

# Built from the corpus alone, nothing trained: the base model closed-book, every document in the prompt, retrieval.
UNTRAINED = ("base", "context", "rag")
# Trained into weights by `engrain train`, each with the module that defines it (imported on first use, so torch
# and peft load only when such a memory is asked for, and a broken one affects only itself).
TRAINED: dict[str, str] = {
    "lora": "engrain.memory.parametric",
    "prefix": "engrain.memory.prefix",
    "memory_layer": "engrain.memory.memory_layer",
    "full": "engrain.memory.parametric",
}
NAMES = (*UNTRAINED, *TRAINED)
HYBRID = "+rag"
# Old name -> new name. Saved memories keep the kind they were saved with, so these stay readable on disk.
ALIASES = {"memory": "memory_layer"}

_noted: set[str] = set()  # old names already announced in this process: one notice each, not one per lookup


def canonical(name: str, *, warn: bool = True) -> str:
    """``name`` stripped and lower-cased, an old kind name (alone or before ``+rag``) replaced by its new one.

    ``warn`` prints the deprecation notice (once per process); names read back from saved memories pass False,
    since the user has nothing to retype there."""
    name = name.strip().lower()
    head, plus, rest = name.partition("+")
    new = ALIASES.get(head)
    if new is None:
        return name
    if warn and head not in _noted:
        _noted.add(head)
        note(f"engrain: the memory '{head}' is now called '{new}'; '{head}' still works for now but will be removed.")
    return new + plus + rest


def old_names(name: str) -> list[str]:
    """The names a kind had before (folders and settings saved under them still count as that kind)."""
    return [old for old, new in ALIASES.items() if new == name]


def is_trained(method: str) -> bool:
    """Whether ``method`` (a name or an ``X+rag`` hybrid) needs a trained memory."""
    return canonical(method, warn=False).split("+")[0] in TRAINED


def kind_options(cfg: dict | None, kind: str) -> dict:
    """The settings of ``kind`` in a trainer config (``cfg["options"][kind]``), found under an old name too."""
    options = (cfg or {}).get("options") or {}
    for key in (kind, *old_names(kind)):
        if options.get(key):
            return dict(options[key])
    return {}


def trained_help(sep: str = " | ") -> str:
    """The trained kinds for a help text: ``lora | prefix | memory_layer | full``."""
    return sep.join(TRAINED)


def methods_help() -> str:
    """Every method for a help text, hybrids shown by their most common one."""
    return ",".join((*NAMES, "lora" + HYBRID))
