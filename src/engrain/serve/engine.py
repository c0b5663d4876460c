"""What the server serves: one base model in memory and every memory of a workspace that can be opened.

Each memory becomes a model name ``<workspace>:<memory>`` (``acme:base``, ``acme:rag``, ``acme:lora+rag``, ...).
A memory is listed only when it opens: ``context`` needs ingested documents, ``rag`` an index, a trained memory
its finished folder under ``memories/`` (and then ``X+rag`` too when the index is there). What did not open is
kept in ``skipped`` with the reason, so the server can say why a memory is missing.

Weights are shared, not copied, wherever the memory allows it:

- LoRA memories (any folder whose kind is ``lora``) are, by default, merged: the adapter folded into a copy of
  the base weights, so its requests decode at the base model's speed with no low-rank matmuls per layer
  (``bench/bench_lora_answer.py`` times both), for one more copy of the weights per LoRA memory. With
  ``lora_adapters`` they are instead adapters of ONE PEFT model wrapped around the base model, a batch
  activating its adapter with ``set_adapter`` (vLLM's multi-LoRA, on one process), and base-model requests run
  with the adapters disabled: many LoRA memories in the memory of one model, each answering more slowly.
- ``prefix`` and ``memory_layer`` memories change the module tree (a KV prefix around it, memory layers inside
  it), so each gets its own module tree whose parameters are the base model's tensors (a deep copy that shares
  every parameter and buffer): the extra memory is the memory's own weights only.
- ``full`` replaces every weight, so it holds a second copy (as a merged LoRA memory does).

``weight_bytes()`` counts the distinct tensors behind all of these, which is how the sharing is checked.
"""

from __future__ import annotations

import copy
import itertools
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import EngrainError
from ..memory.kinds import HYBRID, UNTRAINED, canonical
from ..models import DEFAULT_SYSTEM, LM, chat_messages, chat_prompt
from ..workspace import Workspace
from .passing_thread import on_passing_thread

# Folder names under memories/ that may become model names; anything else is skipped, never opened.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def workspace_model_prefix(ws: Workspace) -> str:
    """The ``<workspace>`` part of model names: the folder's name, lower-cased, safe characters only."""
    name = re.sub(r"[^a-z0-9._-]+", "-", ws.root.name.lower()).strip("-.")
    return name or "workspace"


@dataclass
class Served:
    """One model name the server answers to."""

    model_id: str  # "<workspace>:<memory>"
    memory: str  # "base", "context", "rag", "lora", "lora+rag", ...
    weights: str  # which weights run its forward passes: "base" or a trained memory's name
    layout: str  # how its prompt is made: "chat" (the conversation), "context" (all documents), "rag"
    info: dict = field(default_factory=dict)


def shared_copy(model):
    """A new module tree over the SAME parameter and buffer tensors (no weight is copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Engine:
    """Loads everything a workspace can serve onto one base model and hands out the weights per batch.

    Only the scheduler's worker thread may call ``weights()`` and run the modules it yields: PEFT's active
    adapter is process-wide state.
    """

    def __init__(self, ws: Workspace, lm: LM, *, log=None, lora_adapters: bool = False) -> None:
        self.ws = ws
        self.lora_adapters = lora_adapters
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.prefix = workspace_model_prefix(ws)
        self.log = log or (lambda msg: None)
        self.served: dict[str, Served] = {}
        self.skipped: dict[str, str] = {}
        self.modules: dict[str, object] = {}  # trained memory name -> module (adapters live in _peft)
        self.kinds: dict[str, str] = {}  # trained memory name -> kind
        self.gates: dict[str, object] = {}  # trained memory name -> its RelevanceGate (memory/gate.py), when on
        self._peft = None
        self.context = None  # ContextMemory: its document prefix and cached KV
        self.rag = None  # RagMemory: retrieval and the window-fitting of retrieved chunks
        self._open_all()

    # ---------------------------------------------------------------------------------------------
    # Discovery
    # ---------------------------------------------------------------------------------------------

    def _add(self, memory: str, weights: str, layout: str, info: dict | None = None) -> None:
        model_id = f"{self.prefix}:{memory}"
        self.served[model_id] = Served(model_id, memory, weights, layout, info or {})

    def _open_all(self) -> None:
        self._add("base", "base", "chat", {"model": self.lm.name})
        self._open_context()
        self._open_rag()
        # Trained memories: structure-changing kinds first, from the untouched base model; LoRA last, since PEFT
        # injects its layers into the base model's own modules.
        trained = self._trained_folders()
        for name, kind in sorted(trained.items(), key=lambda kv: kv[1] == "lora"):
            try:
                self._open_trained(name, kind)
            except EngrainError as exc:
                self.skipped[name] = exc.message
                self.log(f"engrain serve: not serving '{name}': {exc.message}")
                continue
            self.kinds[name] = kind
            gate = self._open_gate(name)
            self._add(name, name, "chat", {"kind": kind, "gate": gate.describe() if gate is not None else None})
            if self.rag is not None:
                self._add(f"{name}+rag", name, "rag", {"kind": kind, "gate": gate.describe() if gate else None})
        # How each hybrid answers (rag.hybrid), known once every memory is open: adapters change what "base" runs.
        unfused = []
        for served in self.served.values():
            if served.layout == "rag" and served.weights != "base":
                served.info["hybrid"] = "fused" if self.fuses(served.weights) else "read"
                if self.rag.config.hybrid == "fused" and served.info["hybrid"] == "read":
                    unfused.append(served.memory)
        if unfused:
            self.log(f"engrain serve: rag.hybrid is fused, but {', '.join(unfused)} read the chunks with the memory's "
                     f"weights: fused decoding needs the memory's weights and the base model's side by side "
                     f"(not under --lora-adapters) and engrain's decode loop.")

    def fuses(self, name: str) -> bool:
        """Whether the hybrid of trained memory ``name`` answers by fused decoding (rag.hybrid: fused,
        models/fused.py): the base model reads the chunks while the memory adds what training changed. Needs the
        memory's own module beside the untouched base model (under --lora-adapters they are one model) and
        engrain's decode loop for both."""
        from ..memory.rag import fuses

        return (self.rag is not None and self._peft is None and name in self.modules
                and fuses(self.rag.config, self.modules[name], self.lm.model))

    def _open_context(self) -> None:
        if not self.ws.documents_path.is_file():
            self.skipped["context"] = f"no documents ({self.ws.documents_path} is missing)"
            return
        from ..memory.context import ContextMemory

        try:
            self.context = ContextMemory(self.ws, self.lm)
            self.context.prefix_cache()  # computed now, with the untouched base model, and kept
        except EngrainError as exc:
            self.skipped["context"] = exc.message
            return
        self._add("context", "base", "context", {"context_tokens": len(self.context.prefix_ids),
                                                 "truncated": bool(self.context.truncation.get("truncated"))})

    def _open_rag(self) -> None:
        if not self.ws.index_dir.is_dir():
            self.skipped["rag"] = f"no index ({self.ws.index_dir} is missing)"
            return
        from ..memory.rag import RagMemory

        try:
            rag = RagMemory(self.ws, self.lm)
            rag.retriever  # opens the index now: a broken index is reported at start, not per request
        except EngrainError as exc:
            self.skipped["rag"] = exc.message
            return
        self.rag = rag
        self._add("rag", "base", "rag", {"top_k": rag.config.top_k, "mode": rag.config.mode})

    def _trained_folders(self) -> dict[str, str]:
        """Finished trained memories by folder name -> kind (found by listing memories/, nothing else)."""
        from ..memory.parametric import META_FILE, read_meta

        out: dict[str, str] = {}
        if not self.ws.memories_dir.is_dir():
            return out
        for folder in sorted(self.ws.memories_dir.iterdir()):
            if not folder.is_dir() or not (folder / META_FILE).is_file():
                continue
            if not _SAFE_NAME.match(folder.name) or folder.name.endswith(HYBRID) or folder.name in UNTRAINED:
                self.skipped[folder.name] = "the folder name is not usable as a model name"
                continue
            try:
                # The kind by its current name: a memory saved before a kind was renamed keeps the old one.
                out[folder.name] = canonical(str(read_meta(folder).get("kind", folder.name)), warn=False)
            except EngrainError as exc:
                self.skipped[folder.name] = exc.message
        return out

    def _open_trained(self, name: str, kind: str) -> None:
        from ..memory.parametric import answering_module, check_base, get_kind

        folder = self.ws.memory_dir(name)
        if kind == "lora" and self.lora_adapters:
            check_base(self.lm.model, folder)
            self._load_adapter(name, folder)
            return
        impl = get_kind(kind)
        # `full` and a merged LoRA overwrite every weight, so they need their own copy; the others only add modules.
        own_copy = kind == "full" or hasattr(impl, "merged_for_answering")
        base = copy.deepcopy(self.lm.model) if own_copy else shared_copy(self.lm.model)
        self.modules[name] = answering_module(impl, base, self.tokenizer, folder)

    def _open_gate(self, name: str):
        """The memory's relevance gate (None when answer.gate is off or the memory learned no document the corpus
        holds); a gate that cannot be built leaves the memory answering everything, and says why in the log."""
        from ..memory.parametric import open_gate, read_meta

        folder = self.ws.memory_dir(name)
        try:
            gate = open_gate(self.ws, folder, read_meta(folder))
        except EngrainError as exc:
            self.log(f"engrain serve: '{name}' answers without its relevance gate: {exc.message}")
            return None
        if gate is not None:
            self.gates[name] = gate
        return gate

    def routed_to_base(self, served: Served, question: str) -> bool:
        """True when ``served`` is a trained memory whose gate sends ``question`` to the base weights. The gate's
        embedding runs on a passing thread: the request handlers' threads live on (``passing_thread.py``)."""
        gate = self.gates.get(served.weights) if served.layout in ("chat", "rag") else None
        return gate is not None and not on_passing_thread(lambda: gate.routes([question])[0])

    def _load_adapter(self, name: str, folder) -> None:
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.lm.model, str(folder), adapter_name=name,
                                                       is_trainable=False)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise EngrainError(f"The LoRA adapter in {folder} does not load: {exc}",
                               hint="Train it again with this base model.") from exc

    # ---------------------------------------------------------------------------------------------
    # Serving
    # ---------------------------------------------------------------------------------------------

    def get(self, model_id: str) -> Served | None:
        """The served memory of that exact name, or None: names are only ever looked up in this table."""
        return self.served.get(model_id)

    @contextmanager
    def weights(self, name: str) -> Iterator[object]:
        """The module to run for ``name`` ("base" or a trained memory), with the right adapter active."""
        if name == "base":
            if self._peft is None:
                yield self.lm.model
            else:
                with self._peft.disable_adapter():
                    yield self.lm.model
        elif name in self.modules:
            yield self.modules[name]
        elif self._peft is not None and name in self._peft.peft_config:
            self._peft.set_adapter(name)
            yield self._peft
        else:
            raise KeyError(name)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The conversation through the single chat template, with engrain's system prompt when none is given."""
        if not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}, *messages]
        return self.encode(chat_prompt(self.tokenizer, messages))

    def context_ids(self, question: str) -> tuple[list[int], list[int]]:
        """(the documents' shared prefix, this question's suffix) for the context memory."""
        return self.context.prefix_ids, self.context.question_ids(question)

    def bare_rag_ids(self, question: str) -> list[int]:
        """A rag question's prompt with no chunk at all: the least it can take, and what a fused hybrid's closed-book
        readings read (``RagMemory``'s prompt without chunks)."""
        return self.encode(chat_prompt(self.tokenizer, chat_messages(question, None, self.rag.system)))

    def bare_rag_tokens(self, question: str) -> int:
        """The prompt length of a rag question with no chunk at all (the least it can take)."""
        return len(self.bare_rag_ids(question))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def max_context(self) -> int:
        return self.lm.max_context

    def prepare(self) -> list[str]:
        """Build now what the first requests would otherwise wait for, every request queued behind it: each served
        module's quantized decode weights (``decode_weights.for_model``, cached per module) and the retriever's
        embedding model. Returns what was built."""
        from ..models import decode_weights, fastgen

        built = []
        for name in ["base", *self.modules]:
            with self.weights(name) as m:
                if decode_weights.for_model(fastgen.decoder(m)) is not None:
                    built.append(f"{name} decode weights")
        if self.rag is not None:
            self.rag.retriever.retrieve(["engrain"], 1)
            built.append("retrieval")
        return built

    def warm_up(self) -> list[str]:
        """Compile the decode step of every module that decodes compiled (``model.compile_decode``), before a
        request would wait for it. Returns the names warmed."""
        from ..models import fastgen

        warmed = []
        prompt = self.chat_ids([{"role": "user", "content": "Hello"}])
        for name in ["base", *self.modules]:
            with self.weights(name) as m:
                if fastgen.warm_up(m, prompt, self.tokenizer.pad_token_id):
                    warmed.append(name)
        return warmed

    def weight_bytes(self) -> int:
        """Bytes of distinct tensors behind every served module (shared tensors counted once)."""
        seen: dict[int, int] = {}
        mods = [self.lm.model, *self.modules.values()] + ([self._peft] if self._peft is not None else [])
        for m in mods:
            for t in itertools.chain(m.parameters(), m.buffers()):
                seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return sum(seen.values())

    def models(self) -> list[Served]:
        return list(self.served.values())
