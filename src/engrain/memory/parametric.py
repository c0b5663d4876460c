"""Parametric memories: knowledge trained into weights, and the contract every such memory follows.

One trainer (``engrain/train/loop.py``) trains every kind; each kind only says how it changes the model.

    class ParametricKind(Protocol):            # one per trained memory in kinds.TRAINED
        name: str
        def attach(self, model, tokenizer, cfg: dict, workspace) -> torch.nn.Module
            # returns a module whose forward(input_ids, attention_mask, labels=None) returns an object with .loss
            # and .logits like a HF CausalLM output, with ONLY the memory's parameters requiring grad, and which
            # supports .generate(input_ids=, attention_mask=, **hf_generate_kwargs) so models.generate() works on it.
        def sparse_grad_hook(self, module) -> None   # optional: called after backward, before optimizer step
        def save(self, module, folder: Path, meta: dict) -> None     # safetensors + small json config (lora: PEFT)
        def load(self, model, tokenizer, folder: Path) -> torch.nn.Module   # raises EngrainError on model mismatch
    KINDS: dict[str, ParametricKind]   # registry the trainer and open_memory use; each module registers its kinds

Details the trainer relies on:

- ``cfg`` is ``TrainConfig.model_dump()`` (plain values); settings of one kind live in ``cfg["options"][name]``
  (read into the kind's typed options with ``read_options``) or in fields the kind adds to ``TrainConfig``.
- ``packing`` (optional attribute, default True): the trainer packs several examples into one row and calls
  ``module(input_ids=, attention_mask=None, position_ids=, use_cache=False, logits_to_keep=bool_mask)``;
  ``position_ids`` restart at 0 for each example, which makes transformers build a block-diagonal causal mask
  (attention never crosses examples), and the boolean ``logits_to_keep`` (rows x tokens) makes the model return
  logits only where a loss is taken, flattened to (n_true, vocab). A module that wraps a Hugging Face CausalLM and
  passes ``**kwargs`` on gets both for free. Where the head (found through ``get_output_embeddings`` on the module,
  its ``.module`` or its ``.model``) is a plain ``nn.Linear``, the trainer makes it pass its input through for that
  forward and applies the head itself, fused with the loss (``engrain/train/kernels/head_loss.py``). With ``packing = False``
  every row holds one example, right-padded, and the trainer calls ``module(input_ids=, attention_mask=)`` and
  takes the loss from the full ``.logits``.
- ``default_lr`` (optional attribute): the learning rate when the config leaves ``lr`` unset.
- ``default_pack_tokens`` (optional attribute): the tokens packed into a row when the config leaves ``pack_tokens``
  unset (``seq_len`` without it).
- ``default_replay_sources`` (optional attribute): the replay's sources when the config leaves ``replay_sources``
  unset (the base model's chat answers alone without it).
- ``make_optimizer(module, lr, weight_decay)`` (optional): a kind needing a special optimizer (sparse updates must
  not let Adam momentum or weight decay move slots the batch did not read) returns it; AdamW otherwise.
- ``param_groups(module, lr, cfg)`` (optional): the trainer's AdamW groups, for a kind whose weights train at
  different rates (LoRA+'s larger rate for B); one group of every trained weight otherwise.
- ``save`` writes into ``folder`` (already created); the trainer writes ``engrain_memory.json`` (``meta`` plus
  training metrics) after it, and a memory is complete only when that file exists.
- ``load`` must not change ``model`` in a way visible to other users of it: ``TrainedMemory`` hands it a private
  copy of the base model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import EngrainError
from ..train.kernels.lora_linear import fuse_lora_layers
from ..models import LM
from ..workspace import Workspace
from .base import Answer, BuildInfo, ClosedBook
from .gate import relevance_gate, route
from .kinds import TRAINED, canonical, kind_options

META_FILE = "engrain_memory.json"


@runtime_checkable
class ParametricKind(Protocol):
    name: str

    def attach(self, model, tokenizer, cfg: dict, workspace) -> Any: ...

    def save(self, module, folder: Path, meta: dict) -> None: ...

    def load(self, model, tokenizer, folder: Path) -> Any: ...


KINDS: dict[str, ParametricKind] = {}


def register(kind: ParametricKind) -> ParametricKind:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> ParametricKind:
    """The kind registered under ``name`` (an old name of it too: saved memories keep the kind they were saved
    with), importing its module when needed."""
    name = canonical(name, warn=False)
    if name not in KINDS and name in TRAINED:
        try:
            importlib.import_module(TRAINED[name])
        except ImportError as exc:
            raise EngrainError(f"The '{name}' memory is not available in this installation ({exc}).",
                               hint=f"Available parametric memories: {', '.join(sorted(KINDS))}.") from exc
    if name not in KINDS:
        raise EngrainError(f"Unknown parametric memory '{name}'.", hint=f"Use one of: {', '.join(TRAINED)}.")
    return KINDS[name]


def read_options(cls: type, cfg: dict | None, kind: str) -> Any:
    """``cls`` (a dataclass of one kind's options) from ``cfg["options"][kind]`` over its defaults. Unknown fields
    are refused, integer and boolean fields converted; every error names the field, and the dataclass checks the
    values themselves."""
    raw = kind_options(cfg, kind)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise EngrainError(f"Unknown {kind} option(s): {', '.join(unknown)} (train.options.{kind}).",
                           hint=f"Known options: {', '.join(fields)}.")
    values = {}
    for key, value in raw.items():
        default = fields[key].default
        if isinstance(default, bool):  # before int: a bool is an int too
            value = bool(value)
        elif isinstance(default, int):
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise EngrainError(f"train.options.{kind}.{key} must be an integer, not {value!r}.") from None
        values[key] = value
    return cls(**values)


# --------------------------------------------------------------------------------------------------
# Base-model identity: a trained memory only fits the model it was trained on
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model) -> dict:
    """The shape-defining parts of a model's config; a memory trained on one model loads only onto a match."""
    cfg = model.config
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim")
    dims = {k: getattr(cfg, k, None) for k in keys}
    dims["hash"] = hashlib.sha1(json.dumps(dims, sort_keys=True).encode()).hexdigest()[:12]
    return dims


def check_base(model, folder: Path) -> dict:
    """Read ``folder``'s meta and raise EngrainError when it was trained on a different model shape."""
    meta = read_meta(folder)
    want = meta.get("base_fingerprint", {})
    have = model_fingerprint(model)
    if want and want.get("hash") != have["hash"]:
        diff = ", ".join(f"{k}: trained {want.get(k)} vs loaded {have.get(k)}" for k in have
                         if k != "hash" and want.get(k) != have.get(k))
        raise EngrainError(f"The memory in {folder} was trained on model '{meta.get('base_model')}', "
                           f"which does not match the loaded model ({diff}).",
                           hint="Load it with the same --model it was trained with, or train it again.")
    return meta


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise EngrainError(f"No trained memory in {folder} (missing {META_FILE}).",
                           hint="Train it first: engrain train -w WORKSPACE --memory NAME")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EngrainError(f"{path} is not valid JSON ({exc}).", hint="Train the memory again.") from exc


def trainable_state(module) -> dict:
    """Only the parameters being trained (what a checkpoint must hold), detached and contiguous."""
    return {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# LoRA (PEFT) and full fine-tuning
# --------------------------------------------------------------------------------------------------


def all_linear_names(model) -> list[str]:
    """Short names of every linear layer except the output head (which shares weights with the embeddings)."""
    import torch

    out_head = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not out_head}
    return sorted(names)


class LoraKind:
    """Low-rank adapters via PEFT on every linear layer but the output head (configurable); PEFT layout on disk."""

    name = "lora"
    default_lr = 1e-3
    # Rows of fewer tokens than seq_len: twice the updates for the same tokens answered more on acme and
    # fictional-dev, at the demo's budget and at the full defaults (experiments/knowledge's seq-512 and pack-512 rows).
    default_pack_tokens = 512
    # Half the replay as the base model's own prose kept LoRA+'s answers (its default rate ratio) at a lower
    # general-text perplexity than LoRA+ alone, on squad-dev and fictional-dev (experiments/knowledge's
    # lora-plus-4-self-prose rows).
    default_replay_sources = ("self_distill", "self_prose")

    def attach(self, model, tokenizer, cfg: dict, workspace) -> Any:
        from peft import LoraConfig, get_peft_model

        targets = cfg.get("lora_targets") or "all-linear"
        if targets == "all-linear":
            # Expanded to short layer names (q_proj, ...) rather than PEFT's per-layer paths, so the saved
            # adapter_config.json reads like any hand-written one and serving stacks (vLLM) map it as usual.
            targets = all_linear_names(model)
        elif isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lcfg = LoraConfig(r=int(cfg.get("lora_rank", 16)), lora_alpha=float(cfg.get("lora_alpha", 32)),
                          lora_dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
        try:
            module = get_peft_model(model, lcfg)
        except ValueError as exc:  # e.g. a target name that matches no layer
            raise EngrainError(f"LoRA could not be attached: {exc}",
                               hint="Check train.lora_targets: 'all-linear' or module names like q_proj,v_proj.") from exc
        # Training runs each LoRA layer as one fused function (train/kernels/lora_linear.py); saved adapters stay plain PEFT.
        fuse_lora_layers(module)
        return module

    def param_groups(self, module, lr: float, cfg: dict) -> list[dict]:
        """LoRA+: B's rate ``lora_plus_ratio`` times A's. One group when the ratio is 1, the optimizer state's layout
        before the setting existed, so a checkpoint of such a run still resumes."""
        ratio = float(cfg.get("lora_plus_ratio", 1.0))
        trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if ratio == 1.0:
            return [{"params": [p for _, p in trained]}]
        return [{"params": [p for n, p in trained if "lora_B" not in n]},
                {"params": [p for n, p in trained if "lora_B" in n], "lr": lr * ratio}]

    def save(self, module, folder: Path, meta: dict) -> None:
        module.peft_config["default"].base_model_name_or_path = meta.get("base_model_path") or meta.get("base_model")
        module.save_pretrained(str(folder), safe_serialization=True)

    def load(self, model, tokenizer, folder: Path) -> Any:
        from peft import PeftModel

        check_base(model, folder)
        try:
            module = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise EngrainError(f"The LoRA adapter in {folder} does not fit the loaded model: {exc}",
                               hint="Load it with the model it was trained on (see base_model_name_or_path in "
                                    "adapter_config.json).") from exc
        module.eval()
        return module

    def merged_for_answering(self, module) -> Any:
        """The adapter folded into the copied base weights: a plain model that answers at the base model's speed,
        with no low-rank matmuls per layer (``bench/bench_models.py`` times both). Only this memory's copy changes."""
        return module.merge_and_unload()


class FullKind:
    """Every weight trained: the strongest and most expensive memory (needs ~4x the model's size in RAM for Adam)."""

    name = "full"
    default_lr = 3e-5

    def attach(self, model, tokenizer, cfg: dict, workspace) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, module, folder: Path, meta: dict) -> None:
        module.save_pretrained(str(folder), safe_serialization=True)

    def load(self, model, tokenizer, folder: Path) -> Any:
        from safetensors.torch import load_file

        check_base(model, folder)
        state = {}
        for shard in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(shard)))
        if not state:
            raise EngrainError(f"No weights (*.safetensors) in {folder}.", hint="Train the memory again.")
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied output weights are stored once; anything else missing means another architecture.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise EngrainError(f"The weights in {folder} do not fit the loaded model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]}).",
                               hint="Load it with the model it was trained on.")
        model.eval()
        return model


register(LoraKind())
register(FullKind())


# --------------------------------------------------------------------------------------------------
# The Memory a trained folder becomes
# --------------------------------------------------------------------------------------------------


def answering_module(kind, base, tokenizer, folder: Path):
    """The saved memory in ``folder`` loaded onto ``base`` as it answers: in eval mode and, for a kind that can
    (LoRA), folded into ``base``'s weights so no extra work runs per token. ``base`` may be changed in place."""
    module = kind.load(base, tokenizer, folder)
    merge = getattr(kind, "merged_for_answering", None)
    if merge is not None:
        module = merge(module)
    module.eval()
    return module


class TrainedMemory:
    """A parametric memory loaded from ``WS/memories/<name>/``, answering closed-book.

    ``.lm`` is an ``LM`` whose ``.model`` is the loaded module, so anything that takes an LM (``models.generate``,
    a RAG wrapper for ``X+rag``) works on the trained memory unchanged. The base ``lm`` is not modified.
    """

    def __init__(self, name: str, workspace: Workspace, lm: LM, batch_size: int = 16) -> None:
        self.name = name
        self.workspace = workspace
        self.folder = workspace.memory_dir(name)
        self.meta = read_meta(self.folder)
        self.kind = get_kind(self.meta.get("kind", name))
        self.batch_size = batch_size
        t0 = time.time()
        base = copy.deepcopy(lm.model)  # kinds may inject layers in place; keep the caller's model untouched
        module = answering_module(self.kind, base, lm.tokenizer, self.folder)
        self.lm = LM(model=module, tokenizer=lm.tokenizer, name=f"{lm.name}+{name}", path=lm.path, device=lm.device,
                     load_seconds=time.time() - t0, extra={"memory": name})
        self.base_lm = lm
        self.gate = open_gate(workspace, self.folder, self.meta)

    def build(self, workspace: Workspace) -> BuildInfo:
        # Built by `engrain train`; here only its record is reported.
        return BuildInfo(seconds=float(self.meta.get("train_seconds", 0.0)), disk_bytes=self.disk_bytes(),
                         details={"steps": self.meta.get("steps")})

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def answer(self, questions: list[str], max_new_tokens: int = 48) -> list[Answer]:
        # Closed-book, exactly as the base model is asked: only the weights differ.
        return self._routed(questions, lambda book, qs: book.answer(qs, max_new_tokens=max_new_tokens))

    def complete(self, starts: list[str], max_new_tokens: int = 32) -> list[Answer]:
        # The start alone, continued by the trained weights (see Memory.complete).
        return self._routed(starts, lambda book, qs: book.complete(qs, max_new_tokens=max_new_tokens))

    def _routed(self, texts: list[str], ask) -> list[Answer]:
        """Each text through the gate: the trained weights answer those about the documents, the base weights the
        rest (each Answer's meta names the weights that answered when the gate is on)."""
        if self.gate is None or not texts:
            return ask(ClosedBook(self.lm, self.batch_size), texts)
        return route(self.gate, texts, lambda qs: ask(ClosedBook(self.lm, self.batch_size), qs),
                     lambda qs: ask(ClosedBook(self.base_lm, self.batch_size), qs), self.name)

    def describe(self) -> dict:
        keep = ("kind", "base_model", "steps", "planned_steps", "cut_by_max_minutes", "train_tokens", "train_seconds",
                "final_train_loss", "best_val_loss", "best_val_step", "best_val_answered", "best_over_last",
                "kept_weights_of_step", "trainable_params", "bf16")
        # The training settings as resolved when it trained (a kind's defaults filled in where engrain.yaml left a
        # setting unset), so a result says how its memory was trained, not only what the config asked.
        return {"memory": self.name, "closed_book": True, **{k: self.meta.get(k) for k in keep if k in self.meta},
                "train_config": self.meta.get("config"),
                "gate": self.gate.describe() if self.gate is not None else None}


def open_gate(workspace: Workspace, folder: Path, meta: dict):
    """The memory's relevance gate when the workspace's ``answer.gate`` is on and the memory has learned documents
    the corpus still holds; None otherwise (the trained weights answer everything)."""
    from ..config import load_config

    cfg = load_config(workspace.config_path).answer
    return relevance_gate(workspace, folder, meta, cfg.gate_general_share) if cfg.gate else None
