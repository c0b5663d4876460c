"""A trained KV prefix (Cartridges, Eyuboglu et al. 2025): the corpus compressed into per-layer keys and values.

Every attention layer of the frozen model sees P extra key/value vectors before the prompt, exactly as if P tokens
had been read earlier and kept in the KV cache. Those vectors are the only trained parameters. They start as a
real KV cache of corpus tokens (Cartridges found this much better than random vectors): by default every document's
opening tokens, an equal share each (``init: documents``), or the first P tokens of the corpus (``init: corpus``,
Cartridges' choice). The untrained prefix thus already "has read" how the documents begin, and training packs more
of the corpus in. The defaults (1,024 tokens, ``init: documents``) won the comparison recorded in
docs/experiments.md.

How it plugs into transformers 5 without touching the model:

- the prefix is handed to the model as a pre-filled ``DynamicCache`` (one per forward, expanded to the batch), so
  every layer concatenates it in front of its own keys/values;
- the cached keys already carry RoPE for positions 0..P-1, so the prompt's tokens take positions P, P+1, ...
  (position ids are offset by P; the attention mask gets P ones on the left);
- ``generate()`` passes the same cache and the extended mask to the model's own ``generate``; transformers then
  takes ``input_ids`` as the new tokens only (the mask is longer than them) and numbers positions from the mask.

The first prefix token is kept frozen by default: it becomes the attention sink every later token leans on, and
Cartridges reports that training it makes optimisation unstable.

On disk (``WS/memories/prefix/``): ``prefix.safetensors`` (``keys``, ``values``: layers x kv_heads x P x head_dim)
and ``prefix_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_json
from ..train.kernels.casts import compute_dtype
from ..errors import EngrainError
from ..train.kernels.packed_attention import NAME as PACKED
from .parametric import check_base, read_options, register

WEIGHTS_FILE = "prefix.safetensors"
CONFIG_FILE = "prefix_config.json"
INIT_SOURCES = ("corpus", "documents", "random_tokens")


@dataclass(frozen=True)
class PrefixOptions:
    """The prefix memory's settings (``train.options.prefix``), checked when made."""

    length: int = 1024  # tokens of the prefix
    init: str = "documents"  # what its KV starts as: one of INIT_SOURCES
    freeze_first_token: bool = True  # keep the attention sink fixed (training it is unstable)
    seed: int = 0  # for init: random_tokens

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 2:
            raise EngrainError(f"train.options.prefix.length must be an integer >= 2, not {self.length!r}.",
                               hint="Hundreds to a few thousand tokens (default 1024).")
        if self.init not in INIT_SOURCES:
            raise EngrainError(f"train.options.prefix.init must be one of {', '.join(INIT_SOURCES)}, "
                               f"not {self.init!r}.",
                               hint="'documents' starts from the KV of every document's opening tokens, 'corpus' "
                                    "from the corpus's first tokens.")


# --------------------------------------------------------------------------------------------------
# Reading a model's KV cache for some tokens
# --------------------------------------------------------------------------------------------------


def kv_shape(model) -> dict:
    """Layers, KV heads and head size of a decoder: the shape a prefix must have to fit the model."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    return {"num_layers": int(cfg.num_hidden_layers),
            "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)}


@torch.no_grad()
def kv_of_tokens(model, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's per-layer keys and values for ``token_ids`` read from position 0.

    Returns ``(keys, values)``, each ``layers x kv_heads x len(token_ids) x head_dim`` (RoPE already applied
    to the keys, as the model caches them).
    """
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys.float(), values.float()


def corpus_tokens(tokenizer, texts: list[str], length: int, share: int | None = None) -> list[int]:
    """The first ``length`` tokens of the documents read one after another (a blank line between them), taking
    at most ``share`` tokens of each document when given."""
    ids: list[int] = []
    for text in texts:
        if len(ids) >= length:
            break
        piece = text if not ids else "\n\n" + text
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"][:share])
    return ids[:length]


def document_openings(tokenizer, texts: list[str], length: int) -> list[int]:
    """The opening tokens of every document, an equal share of ``length`` each (at least 8).

    With more documents than a prefix can hold from the first one onward, this starts the prefix having read how
    each document begins (its subject, its first facts) rather than all of the first few documents.
    """
    return corpus_tokens(tokenizer, texts, length, share=max(length // max(len(texts), 1), 8))


def random_tokens(tokenizer, length: int, seed: int) -> list[int]:
    """Token ids drawn uniformly from the ordinary vocabulary (special tokens excluded): the Cartridges baseline."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(vocab), (length,), generator=gen).tolist()
    return [vocab[i] for i in picks]


# --------------------------------------------------------------------------------------------------
# The model with a trainable prefix
# --------------------------------------------------------------------------------------------------


class PrefixLM(nn.Module):
    """A frozen causal LM reading a trainable KV prefix before every input.

    ``keys``/``values`` (``layers x kv_heads x P' x head_dim``) are the trained part; ``sink_keys``/``sink_values``
    hold the frozen first token (empty when ``freeze_first_token`` is off).
    """

    def __init__(self, model, keys: torch.Tensor, values: torch.Tensor, freeze_first_token: bool = True) -> None:
        super().__init__()
        if keys.shape != values.shape or keys.ndim != 4:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must match, 4-D")
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        n_sink = 1 if freeze_first_token and keys.shape[2] > 1 else 0
        device = next(model.parameters()).device
        self.register_buffer("sink_keys", keys[:, :, :n_sink].clone().to(device))
        self.register_buffer("sink_values", values[:, :, :n_sink].clone().to(device))
        self.keys = nn.Parameter(keys[:, :, n_sink:].clone().to(device))
        self.values = nn.Parameter(values[:, :, n_sink:].clone().to(device))
        # What LM.max_context and generation read from the wrapped model.
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)

    @property
    def prefix_length(self) -> int:
        return self.sink_keys.shape[2] + self.keys.shape[2]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole prefix, sink included: ``layers x kv_heads x P x head_dim``."""
        return torch.cat([self.sink_keys, self.keys], 2), torch.cat([self.sink_values, self.values], 2)

    def _dtype(self) -> torch.dtype:
        # Under autocast the layers make keys in the autocast dtype; the cache must match them to be concatenated.
        return compute_dtype(self.keys, default=next(self.model.parameters()).dtype)

    def make_cache(self, batch_size: int):
        """A DynamicCache pre-filled with the prefix for ``batch_size`` rows (a view: no copy per row)."""
        from transformers import DynamicCache

        keys, values = self.prefix_kv()
        dtype = self._dtype()
        layers = [(k.to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1),
                   v.to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1)) for k, v in zip(keys, values)]
        return DynamicCache(layers, config=self.model.config)

    def _packed_mask(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A 4-D mask for packed rows: every token sees the whole prefix, and only earlier tokens of its own
        example (examples start where position ids restart at 0)."""
        batch, length = position_ids.shape
        example = (position_ids == 0).long().cumsum(-1)
        same = example[:, :, None] == example[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
        allowed = torch.cat([torch.ones(batch, length, self.prefix_length, dtype=torch.bool,
                                        device=position_ids.device), same & causal], dim=-1)[:, None]
        if self.model.config._attn_implementation == "eager":  # eager attention adds the mask to the scores
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None,
                position_ids: torch.Tensor | None = None, **kwargs) -> Any:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("PrefixLM builds its own cache; call generate() for incremental decoding")
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        kwargs.pop("use_cache", None)  # the prefix cache is read whatever the caller wanted cached
        batch, length = input_ids.shape
        p = self.prefix_length
        if attention_mask is None and position_ids is not None:
            # Packed rows: position ids restart per example; each example sits right after the prefix. The trainer's
            # packed attention needs no mask (it finds the examples from the positions and sees the prefix whole).
            packed_attention = self.model.config._attn_implementation == PACKED
            mask = None if packed_attention else self._packed_mask(position_ids, self._dtype())
            positions = position_ids + p
        else:
            if attention_mask is None:
                attention_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
            mask = torch.cat([torch.ones(batch, p, dtype=attention_mask.dtype, device=attention_mask.device),
                              attention_mask], dim=1)
            # Counting only real tokens keeps left-padded rows right after the prefix too.
            positions = (position_ids + p) if position_ids is not None else \
                (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + p
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, labels=labels,
                          cache=self.make_cache(batch), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``model.generate`` with the prefix in the cache; returns prompt + new tokens like the model's own."""
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("PrefixLM.generate builds its own cache; do not pass one")
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([torch.ones(batch, self.prefix_length, dtype=attention_mask.dtype,
                                     device=attention_mask.device), attention_mask], dim=1)
        return self.model.generate(input_ids=input_ids, attention_mask=mask, cache=self.make_cache(batch), **kwargs)


# --------------------------------------------------------------------------------------------------
# The kind: attach / save / load
# --------------------------------------------------------------------------------------------------


def prefix_options(cfg: dict | None) -> PrefixOptions:
    """This memory's settings: ``cfg["options"]["prefix"]`` over the defaults, checked."""
    return read_options(PrefixOptions, cfg, "prefix")


class PrefixKind:
    """The ``prefix`` memory for the trainer: a KV prefix initialised from the corpus."""

    name = "prefix"
    default_lr = 2e-2  # Cartridges trains its KV vectors with a large learning rate (they are activations)

    def attach(self, model, tokenizer, cfg: dict, workspace) -> PrefixLM:
        opts = prefix_options(cfg)
        length = opts.length
        if opts.init in ("corpus", "documents"):
            from ..corpus.schema import read_documents

            if workspace is None:
                raise EngrainError("The prefix starts from the corpus, but no workspace was given.",
                                   hint="Pass the workspace, or set train.options.prefix.init: random_tokens.")

            docs = read_documents(workspace)
            read = corpus_tokens if opts.init == "corpus" else document_openings
            ids = read(tokenizer, [d.text for d in docs if d.text.strip()], length)
            if len(ids) < 2:
                raise EngrainError(f"The corpus in {workspace.documents_path} has no text to start the prefix from.",
                                   hint="Ingest some documents first, or set train.options.prefix.init: random_tokens.")
        else:
            ids = random_tokens(tokenizer, length, opts.seed)
        if len(ids) + 1 >= getattr(model.config, "max_position_embeddings", 1 << 30):
            raise EngrainError(f"A prefix of {len(ids)} tokens does not fit the model's window.",
                               hint="Lower train.options.prefix.length.")
        keys, values = kv_of_tokens(model, ids)
        module = PrefixLM(model, keys, values, freeze_first_token=opts.freeze_first_token)
        module.options = opts
        return module

    def save(self, module: PrefixLM, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        module = getattr(module, "module", module)  # unwrap DDP
        keys, values = module.prefix_kv()
        folder = Path(folder)
        save_file({"keys": keys.detach().float().cpu().contiguous(),
                   "values": values.detach().float().cpu().contiguous()}, str(folder / WEIGHTS_FILE))
        opts = getattr(module, "options", PrefixOptions())
        write_json(folder / CONFIG_FILE, {
            "kind": self.name, "prefix_length": module.prefix_length,
            "frozen_first_token": module.sink_keys.shape[2] == 1, "init": opts.init,
            **kv_shape(module.model), "base_model": meta.get("base_model"),
        })

    def load(self, model, tokenizer, folder: Path) -> PrefixLM:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        check_base(model, folder)
        config_path = folder / CONFIG_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            tensors = load_file(str(folder / WEIGHTS_FILE))
            keys, values = tensors["keys"], tensors["values"]
        except FileNotFoundError as exc:
            raise EngrainError(f"The prefix in {folder} is incomplete ({Path(exc.filename).name} is missing).",
                               hint="Train it again: engrain train --memory prefix") from exc
        except (ValueError, KeyError, SafetensorError) as exc:
            raise EngrainError(f"The prefix in {folder} is unreadable ({exc}).",
                               hint="Train it again: engrain train --memory prefix") from exc
        want = kv_shape(model)
        have = {"num_layers": keys.shape[0], "num_kv_heads": keys.shape[1], "head_dim": keys.shape[3]}
        if have != want or keys.shape != values.shape:
            raise EngrainError(f"The prefix in {folder} was trained for a model with {have} but the loaded model has "
                               f"{want}.", hint=f"Load it with the model it was trained on "
                                               f"({config.get('base_model') or 'see prefix_config.json'}).")
        dtype = next(model.parameters()).dtype
        module = PrefixLM(model, keys.to(dtype), values.to(dtype),
                          freeze_first_token=bool(config.get("frozen_first_token", True)))
        module.options = PrefixOptions(length=module.prefix_length, init=config.get("init") or PrefixOptions.init,
                                       freeze_first_token=module.sink_keys.shape[2] == 1)
        module.requires_grad_(False)
        module.eval()
        return module


register(PrefixKind())
