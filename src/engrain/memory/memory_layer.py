"""A product-key memory layer (Memory Layers at Scale, Berges et al. 2024) trained with sparse updates
(Continual Learning via Sparse Memory Fine-tuning, Lin et al. 2025).

A memory is a table of N value vectors added, as a residual branch, to the MLP output of chosen blocks of the
frozen model. Each token reads only k of the N slots:

    q          = W_q x                      (per head, split in two halves q1, q2)
    candidates = top-k of (q1 . K1) and top-k of (q2 . K2)        K1, K2: two tables of sqrt(N) sub-keys
    slots      = top-k of the k*k sums s1[i] + s2[j]              slot id = i * sqrt(N) + j
    out        = sum over heads and slots of softmax(score) * V[slot]

so finding the best of N slots costs O(sqrt(N)) dot products. Values start at zero: attaching the memory leaves
the model's outputs unchanged, and training only ever writes into it.

``standardize: true`` (off by default) first maps x to (x - mean) / std per dimension, measured on general text
at attach: it spreads the reads a random projection of raw hidden states crowds into few slots
(``bench/exp_slot_reads.py``), which did not help learning in docs/experiments.md.

Sparse updates, so that new facts interfere as little as possible with what the model already does:

1. only value rows a batch actually read receive gradient (a dense gradient of an embedding bag is exactly zero
   elsewhere), and the optimizer (``RowSparseAdamW``) moves only rows with a non-zero gradient: no momentum or
   weight decay drift on slots the batch did not touch;
2. of the rows read, only the ``top_t`` with the highest TF-IDF score are kept (``sparse_grad_hook``): TF = how
   often this batch read the slot, IDF = how rarely general text reads it. The general text is the package's
   general prompts in the chat template and its general prose openings (``background_texts``; never the text
   forgetting is measured on), read once when the memory is attached. Slots that general requests lean on are
   thus left alone: that is what keeps forgetting low in the sparse memory fine-tuning paper. ``top_t: 0`` keeps
   every row read.

Query projections and sub-keys are trained (densely) only with ``train_keys: true``. An update (``engrain
update``) counts the reads of the documents learned before as background too (``memory/continued.py``). On disk:
``memory_layer.safetensors`` (``layers.<i>.<param>``) and ``memory_config.json``; settings:
``train.options.memory_layer`` (``MemoryLayerOptions``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import write_json
from ..errors import EngrainError
from .parametric import check_base, read_options, register

WEIGHTS_FILE = "memory_layer.safetensors"
CONFIG_FILE = "memory_config.json"
SHAPE_KEYS = ("slots", "heads", "topk", "key_dim")
WHERE = "train.options.memory_layer"  # where users set these options, for error messages


@dataclass(frozen=True)
class MemoryLayerOptions:
    """The memory layer's settings (``train.options.memory_layer``), checked when made."""

    # Three blocks, values only, a large rate: learns what one middle block with keys at 1e-3 did not; top_t forgot
    # less than every row read, for less learning (experiments/knowledge's memory-layer rows)
    layers: str | list[int] = "spread"  # 'middle', 'spread', or block indices: see resolve_layers
    slots: int = 16384  # value slots per memory; a square number (product keys address sqrt(slots) x sqrt(slots))
    heads: int = 4
    topk: int = 32  # slots each head reads per token
    key_dim: int = 128  # even: a query splits in two halves
    top_t: int = 4096  # value rows updated per step, by TF-IDF (0: every row read)
    train_keys: bool = False  # True: the product keys train too
    standardize: bool = False  # standardise the lookup's input (see the module's docstring)

    def __post_init__(self) -> None:
        n_sub = math.isqrt(max(0, self.slots))
        if self.slots < 4 or n_sub * n_sub != self.slots:
            raise EngrainError(f"{WHERE}.slots must be a square number >= 4, not {self.slots}.",
                               hint="For example 16384 (128 x 128) or 65536 (256 x 256).")
        if not 1 <= self.topk <= n_sub:
            raise EngrainError(f"{WHERE}.topk must be between 1 and sqrt(slots) = {n_sub}, not {self.topk}.")
        if self.heads < 1:
            raise EngrainError(f"{WHERE}.heads must be >= 1, not {self.heads}.")
        if self.key_dim < 2 or self.key_dim % 2:
            raise EngrainError(f"{WHERE}.key_dim must be an even number >= 2, not {self.key_dim}.")
        if self.top_t < 0:
            raise EngrainError(f"{WHERE}.top_t must be >= 0 (0 = update every slot read), not {self.top_t}.")


# --------------------------------------------------------------------------------------------------
# The memory
# --------------------------------------------------------------------------------------------------


class ProductKeyMemory(nn.Module):
    """N = n_sub**2 value slots addressed by product keys; ``forward(x) -> (..., hidden)``."""

    def __init__(self, hidden: int, slots: int, heads: int = 4, topk: int = 32, key_dim: int = 128,
                 layer_idx: int = 0) -> None:
        super().__init__()
        n_sub = math.isqrt(slots)
        if n_sub * n_sub != slots or key_dim % 2 or topk > n_sub:
            raise ValueError(f"slots ({slots}) must be a square, key_dim ({key_dim}) even, topk ({topk}) <= sqrt(slots)")
        self.hidden, self.slots, self.heads, self.topk, self.key_dim = hidden, slots, heads, topk, key_dim
        self.n_sub, self.layer_idx = n_sub, layer_idx
        self.query = nn.Linear(hidden, heads * key_dim, bias=False)
        bound = 1.0 / math.sqrt(key_dim // 2)
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, n_sub, key_dim // 2).uniform_(-bound, bound))
        self.values = nn.Parameter(torch.zeros(slots, hidden))
        # The query reads (x - in_mean) * in_scale; identity until measure_inputs sets them.
        self.register_buffer("in_mean", torch.zeros(hidden), persistent=False)
        self.register_buffer("in_scale", torch.ones(hidden), persistent=False)
        # Reads since the last sparse_grad_hook (TF) and the general-text IDF of every slot.
        self.register_buffer("reads", torch.zeros(slots), persistent=False)
        self.register_buffer("idf", torch.ones(slots), persistent=False)
        self.count_reads = False

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids and weights for each row of ``x`` (rows x hidden): both rows x (heads * topk)."""
        n, h, k = x.shape[0], self.heads, self.topk
        x = (x - self.in_mean.to(x.dtype)) * self.in_scale.to(x.dtype)
        q = self.query(x).view(n, h, 2, self.key_dim // 2)
        scores = torch.einsum("nhcd,hcsd->nhcs", q, self.sub_keys.to(q.dtype))  # rows x heads x 2 x n_sub
        top_s, top_i = scores.topk(k, dim=-1)
        pair = (top_s[:, :, 0, :, None] + top_s[:, :, 1, None, :]).reshape(n, h, k * k)
        best, flat = pair.topk(k, dim=-1)
        ids = top_i[:, :, 0].gather(-1, flat // k) * self.n_sub + top_i[:, :, 1].gather(-1, flat % k)
        weights = torch.softmax(best.float(), dim=-1)
        return ids.reshape(n, h * k), weights.reshape(n, h * k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        ids, weights = self.lookup(x.reshape(-1, shape[-1]))
        if self.count_reads or (self.training and torch.is_grad_enabled()):
            with torch.no_grad():
                self.reads += torch.bincount(ids.flatten(), minlength=self.slots).to(self.reads.dtype)
        out = F.embedding_bag(ids, self.values, per_sample_weights=weights.to(self.values.dtype), mode="sum")
        return out.reshape(shape).to(x.dtype)


class MLPWithMemory(nn.Module):
    """A block's MLP with a memory read added to its output (the memory sees the MLP's input)."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.mlp = mlp
        self.memory = memory

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.mlp(x, *args, **kwargs)
        return out + self.memory(x).to(out.dtype)


def memories(module) -> list[ProductKeyMemory]:
    """The memories attached anywhere inside ``module`` (a DDP wrapper included), by layer."""
    found = [m for m in module.modules() if isinstance(m, ProductKeyMemory)]
    return sorted(found, key=lambda m: m.layer_idx)


# --------------------------------------------------------------------------------------------------
# Wiring into a model
# --------------------------------------------------------------------------------------------------


def decoder_layers(model) -> list[nn.Module]:
    """The transformer blocks of a causal LM, each with an ``.mlp``; EngrainError when the model has none."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise EngrainError(f"The memory layer needs a model whose blocks have an '.mlp' ({type(model).__name__} "
                           "does not).", hint="Use a Llama-style model (the embedded default is one), or another memory.")
    return list(layers)


def resolve_layers(spec: Any, n_layers: int) -> list[int]:
    """``middle`` | ``spread`` (quarter, half, three quarters) | a list or comma string of block indices."""
    if spec == "middle":
        return [n_layers // 2]
    if spec == "spread":
        return sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    items = spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, (list, tuple)) else [spec]
    try:
        idx = sorted({int(str(i).strip()) for i in items})
    except ValueError:
        idx = []
    if not idx or any(i < 0 or i >= n_layers for i in idx):
        raise EngrainError(f"{WHERE}.layers is {spec!r}; the model has blocks 0..{n_layers - 1}.",
                           hint="Use 'middle', 'spread', or block indices like [8, 15].")
    return idx


def memory_options(cfg: dict | None) -> MemoryLayerOptions:
    """This memory's settings: ``cfg["options"]["memory_layer"]`` over the defaults, checked."""
    return read_options(MemoryLayerOptions, cfg, "memory_layer")


def add_memories(model, opts: MemoryLayerOptions, layer_ids: list[int]) -> list[ProductKeyMemory]:
    """Wrap the MLP of each chosen block with a fresh memory; freeze the base; return the memories."""
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = decoder_layers(model)
    hidden = int(model.config.hidden_size)
    param = next(model.parameters())
    added = []
    for i in layer_ids:
        if isinstance(blocks[i].mlp, MLPWithMemory):
            raise EngrainError(f"Block {i} already has a memory layer.", hint="Attach a memory to a fresh model.")
        mem = ProductKeyMemory(hidden, opts.slots, opts.heads, opts.topk, opts.key_dim, layer_idx=i)
        mem.to(device=param.device, dtype=param.dtype)
        blocks[i].mlp = MLPWithMemory(blocks[i].mlp, mem)
        mem.query.weight.requires_grad_(opts.train_keys)
        mem.sub_keys.requires_grad_(opts.train_keys)
        added.append(mem)
    return added


# --------------------------------------------------------------------------------------------------
# Sparse updates: TF-IDF slot selection and a row-sparse AdamW
# --------------------------------------------------------------------------------------------------


def background_texts(tokenizer) -> list[str]:
    """The package's general prompts in the chat template (a user's everyday requests) and its prose openings; not
    the general text forgetting is measured on, which would pick slots to spare exactly what is measured."""
    from ..models import chat_messages, chat_prompt
    from ..train.replay import replay_openings, replay_prompts

    return [chat_prompt(tokenizer, chat_messages(p)) for p in replay_prompts()] + replay_openings()


def background_ids(tokenizer) -> list[int]:
    """The background texts as one run of token ids, tokenised once for every measurement at attach."""
    ids: list[int] = []
    for text in background_texts(tokenizer):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def read_through(model, ids: list[int], window: int = 512) -> None:
    """Run token ids back to back in windows through the blocks only (no output head is needed)."""
    device = next(model.parameters()).device
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for start in range(0, len(ids), window):
        decoder(input_ids=torch.tensor([ids[start:start + window]], device=device))


@torch.no_grad()
def measure_inputs(model, mems: list[ProductKeyMemory], ids: list[int]) -> int:
    """Set each memory's ``in_mean`` / ``in_scale`` to the per-dimension mean and 1/std of its input over the
    token ids. Returns how many were read (0: nothing to measure; the lookup stays unstandardised)."""
    if len(ids) < 2 or not mems:
        return 0
    # Running sums in float64 per memory: the sum of x and of x squared over every token read.
    sums = {m: torch.zeros(2, m.hidden, dtype=torch.float64, device=m.in_mean.device) for m in mems}

    def collect(mem, args):
        x = args[0].detach().double().reshape(-1, mem.hidden)
        sums[mem] += torch.stack([x.sum(0), (x * x).sum(0)])

    hooks = [m.register_forward_pre_hook(collect) for m in mems]
    try:
        read_through(model, ids)
    finally:
        for h in hooks:
            h.remove()
    n = float(len(ids))
    for m in mems:
        total, squares = sums[m]
        mean = total / n
        std = (squares / n - mean * mean).clamp_min(0).sqrt()
        m.in_mean.copy_(mean.to(m.in_mean.dtype))
        # A floor keeps a near-constant dimension from turning noise into the whole query.
        m.in_scale.copy_((1.0 / std.clamp_min(1e-3 * float(std.max()) + 1e-6)).to(m.in_scale.dtype))
    return len(ids)


@torch.no_grad()
def count_reads(model, mems: list[ProductKeyMemory], ids: list[int]) -> None:
    """Read token ids through the model with each memory counting in ``reads`` how often each of its slots is read."""
    for m in mems:
        m.reads.zero_()
        m.count_reads = True
    try:
        read_through(model, ids)
    finally:
        for m in mems:
            m.count_reads = False


@torch.no_grad()
def measure_idf(model, mems: list[ProductKeyMemory], ids: list[int]) -> int:
    """Read T background token ids through the model; each memory's IDF = log((T + 1) / (reads + 1)). Returns T."""
    if not ids or not mems:
        return 0
    count_reads(model, mems, ids)
    for m in mems:
        # Each token reads heads * topk slots; normalise to "tokens that read the slot" scale.
        per_token = m.reads / (m.heads * m.topk)
        m.idf.copy_(torch.log((len(ids) + 1.0) / (per_token + 1.0)))
        m.reads.zero_()
    return len(ids)


def select_rows(mem: ProductKeyMemory, top_t: int) -> torch.Tensor:
    """Boolean mask of the value rows to update this step: the ``top_t`` read rows by TF-IDF (all read rows when
    ``top_t`` is 0 or at least the number read). Reads are summed over processes so every replica agrees."""
    reads = mem.reads
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reads = reads.clone()
        torch.distributed.all_reduce(reads)
    read = reads > 0
    n_read = int(read.sum())
    if top_t <= 0 or n_read <= top_t:
        return read
    score = torch.where(read, reads * mem.idf, torch.full_like(reads, -1.0))
    keep = torch.zeros_like(read)
    keep[score.topk(top_t).indices] = True
    return keep


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW that, for groups marked ``row_sparse``, updates only the rows whose gradient is non-zero.

    Untouched rows keep their value, moments and step count (a lazy Adam with per-row bias correction), so neither
    momentum nor weight decay moves a memory slot the batch did not read. Other groups are plain AdamW.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, row_sparse=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    # Not named "step": torch treats that key specially when a checkpoint is loaded.
                    state["row_step"] = torch.zeros(p.shape[0] if group["row_sparse"] else 1, device=p.device)
                m, v, steps = state["exp_avg"], state["exp_avg_sq"], state["row_step"]
                if group["row_sparse"]:
                    rows = (g != 0).any(dim=1).nonzero().squeeze(1)
                    if rows.numel() == 0:
                        continue
                    g, pr = g[rows], p[rows]
                    steps[rows] += 1
                    t = steps[rows].unsqueeze(1)
                    m_r = m[rows].mul_(b1).add_(g, alpha=1 - b1)
                    v_r = v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
                    m[rows], v[rows] = m_r, v_r
                    update = (m_r / (1 - b1 ** t)) / ((v_r / (1 - b2 ** t)).sqrt() + eps)
                    p[rows] = pr * (1 - lr * wd) - lr * update
                else:
                    steps += 1
                    t = float(steps.item())
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(m / (1 - b1 ** t), (v / (1 - b2 ** t)).sqrt().add_(eps), value=-lr)
        return loss


# --------------------------------------------------------------------------------------------------
# The kind: attach / sparse hook / optimizer / save / load
# --------------------------------------------------------------------------------------------------


class MemoryLayerKind:
    """The ``memory_layer`` memory for the trainer: product-key memories in chosen blocks, sparsely updated.

    The module it attaches or loads carries ``engrain_memory_options`` (``MemoryLayerOptions``, ``layers`` resolved
    to block indices), which the sparse hook and ``save`` read."""

    name = "memory_layer"
    # Values are embedding rows that start at zero: they take large steps. 0.1 learned far more than 3e-2 on
    # fictional-dev-10, its weights forgetting more general QA (experiments/knowledge's memory-layer rows).
    default_lr = 0.1

    def attach(self, model, tokenizer, cfg: dict, workspace) -> Any:
        opts = memory_options(cfg)
        layer_ids = resolve_layers(opts.layers, len(decoder_layers(model)))
        mems = add_memories(model, opts, layer_ids)
        was_training = model.training
        model.eval()
        ids = background_ids(tokenizer)
        if opts.standardize:
            measure_inputs(model, mems, ids)  # first: the IDF is measured with the final lookup
        model.engrain_background_tokens = measure_idf(model, mems, ids)
        model.train(was_training)
        model.engrain_memory_options = replace(opts, layers=layer_ids)
        return model

    def sparse_grad_hook(self, module) -> None:
        """Zero the value gradient of every row outside this step's TF-IDF top-t; reset the read counts."""
        top_t = getattr(module, "engrain_memory_options", MemoryLayerOptions()).top_t
        for mem in memories(module):
            keep = select_rows(mem, top_t)
            if mem.values.grad is not None:
                mem.values.grad[~keep] = 0
            mem.reads.zero_()

    def make_optimizer(self, module, lr: float, weight_decay: float) -> RowSparseAdamW:
        mems = memories(module)
        values = [m.values for m in mems]
        dense = [p for m in mems for p in (m.query.weight, m.sub_keys) if p.requires_grad]
        groups = [{"params": values, "row_sparse": True}]
        if dense:
            groups.append({"params": dense})
        return RowSparseAdamW(groups, lr=lr, weight_decay=weight_decay)

    def save(self, module, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        mems = memories(module)
        tensors = {}
        for m in mems:
            for pname, t in _saved(m).items():
                tensors[f"layers.{m.layer_idx}.{pname}"] = t.detach().float().cpu().contiguous()
        save_file(tensors, str(Path(folder) / WEIGHTS_FILE))
        opts = getattr(module, "engrain_memory_options", MemoryLayerOptions())
        write_json(Path(folder) / CONFIG_FILE, {
            "kind": self.name, "layers": [m.layer_idx for m in mems],
            **{k: getattr(mems[0], k) for k in SHAPE_KEYS}, "top_t": opts.top_t,
            "train_keys": opts.train_keys, "standardize": opts.standardize,
            "hidden_size": mems[0].hidden,
            "num_hidden_layers": len(decoder_layers(module)), "base_model": meta.get("base_model"),
        })

    def load(self, model, tokenizer, folder: Path) -> Any:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        check_base(model, folder)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(folder / WEIGHTS_FILE))
        except FileNotFoundError as exc:
            raise EngrainError(f"The memory layer in {folder} is incomplete ({Path(exc.filename).name} is missing).",
                               hint="Train it again: engrain train --memory memory_layer") from exc
        except (ValueError, SafetensorError) as exc:
            raise EngrainError(f"The memory layer in {folder} is unreadable ({exc}).",
                               hint="Train it again: engrain train --memory memory_layer") from exc
        n_layers = len(decoder_layers(model))
        hidden = int(model.config.hidden_size)
        if config.get("hidden_size") != hidden or config.get("num_hidden_layers") != n_layers:
            raise EngrainError(
                f"The memory layer in {folder} was trained for a model with hidden size {config.get('hidden_size')} "
                f"and {config.get('num_hidden_layers')} blocks; the loaded model has {hidden} and {n_layers}.",
                hint=f"Load it with the model it was trained on ({config.get('base_model') or 'see memory_config.json'}).")
        layer_ids = [int(i) for i in config["layers"]]
        top_t = config.get("top_t")
        opts = MemoryLayerOptions(layers=layer_ids, **{k: int(config[k]) for k in SHAPE_KEYS}, train_keys=False,
                                  standardize=bool(config.get("standardize")),
                                  top_t=MemoryLayerOptions.top_t if top_t is None else int(top_t))
        mems = add_memories(model, opts, layer_ids)
        dtype = next(model.parameters()).dtype
        copy_saved(mems, tensors, folder)
        for m in mems:
            m.to(dtype)
            m.requires_grad_(False)
        model.engrain_memory_options = opts
        model.eval()
        return model


@torch.no_grad()
def copy_saved(mems: list[ProductKeyMemory], tensors: dict, folder: Path) -> None:
    """The saved tensors of the memory in ``folder`` copied into ``mems`` (same blocks and shapes, or EngrainError)."""
    try:
        for m in mems:
            for pname, target in _saved(m).items():
                key = f"layers.{m.layer_idx}.{pname}"
                if pname.startswith("in_") and key not in tensors:
                    continue  # saved before standardising existed: the identity it was trained with
                src = tensors[key]
                if src.shape != target.shape:
                    raise KeyError(f"{key} has shape {tuple(src.shape)}, expected {tuple(target.shape)}")
                target.copy_(src)
    except KeyError as exc:
        raise EngrainError(f"The memory layer in {folder} does not match its memory_config.json ({exc}).",
                           hint="Train it again: engrain train --memory memory_layer") from exc


def _saved(mem: ProductKeyMemory) -> dict[str, torch.Tensor]:
    """What a saved memory holds, by name: its trained tensors and its input standardisation."""
    return {"query": mem.query.weight, "sub_keys": mem.sub_keys, "values": mem.values,
            "in_mean": mem.in_mean, "in_scale": mem.in_scale}


register(MemoryLayerKind())
