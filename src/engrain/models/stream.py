"""Continuous batching for the server (``engrain serve``): rows join a running decode whenever the caller admits them
and leave when the caller says they are done, on the decode loop of ``fastgen.py`` (its prefill, merge and step)."""

from __future__ import annotations

import torch

from . import decode_weights
from .chunk_cache import ChunkCache, assemble
from .fastgen import _merge, _row_kv, _Rows, _sample, _step, decoder, prefill_after_starts, trained_prefix
from .prompt_cache import PromptCache

# How much padding a CPU prefill group may take (``length_groups``): a share of the tokens it holds, or a number of
# tokens where that is more. A CPU forward costs a fixed part (every weight read once) plus a part per token; the
# fixed part is worth a few dozen tokens here (``python bench/bench_prefill.py`` fits both), so a second forward for
# short prompts costs more than padding them together.
PAD_SLACK = 0.25
PAD_TOKENS = 32


def length_groups(prompts: dict[int, list[int]]) -> list[dict[int, list[int]]]:
    """``prompts`` (the tokens each must prefill) split, shortest first, into groups that pad to their longest with at
    most ``PAD_SLACK`` more tokens than they hold, or ``PAD_TOKENS`` where that is more. On a CPU a long prefill costs
    about as much per token for one prompt as for many (``python bench/bench_prefill.py`` runs both), so padding a
    short rag prompt to a long one is time lost, while short prompts (a chat question after a cached system prompt)
    are cheaper in one forward than in several."""
    groups: list[dict[int, list[int]]] = []
    group: dict[int, list[int]] = {}
    tokens = 0
    for handle in sorted(prompts, key=lambda h: len(prompts[h])):
        n = len(prompts[handle])
        padding = n * (len(group) + 1) - (tokens + n)
        if group and padding > max(PAD_TOKENS, PAD_SLACK * (tokens + n)):
            groups.append(group)
            group, tokens = {}, 0
        group[handle] = prompts[handle]
        tokens += n
    return groups + [group] if group else groups


class Stream:
    """Continuous batching for a server: rows join whenever the caller admits them and leave when the caller
    says they are done (their own stop strings, token budgets, a client gone); each ``step`` gives one token
    per live row. Same modules and greedy tokens as ``generate_many`` (one row's tokens do not depend on the
    rows beside it, up to floating-point rounding: left padding is masked)."""

    def __init__(self, model, *, pad_id: int, temperature: float = 0.0, top_p: float = 1.0, prefix=None,
                 prompt_cache: PromptCache | None = None, chunk_cache: ChunkCache | None = None) -> None:
        prefix = prefix if prefix is not None else trained_prefix(model)
        self.prompt_cache = prompt_cache  # this model's recent prompts' KV (prompt_cache.py), reused and added to
        self.chunk_cache = chunk_cache  # retrieved chunks' KV, placed wherever they come back (chunk_cache.py)
        self.model = decoder(model)
        self.quant = decode_weights.for_model(self.model)  # a server's weights do not change under a stream
        self.device = self.model.model.embed_tokens.weight.device
        self.pad_id, self.temperature, self.top_p, self.prefix = pad_id, temperature, top_p, prefix
        self.rows: _Rows | None = None
        self.budget: dict[int, int] = {}  # row handle -> most tokens it may produce
        self._next = 0
        # Tokens through prefill forwards so far: the prompts' own (after any reused KV) and the padding beside them
        self.prefilled = {"tokens": 0, "padding": 0}

    def __len__(self) -> int:
        return 0 if self.rows is None else int((~self.rows.done).sum())

    @torch.inference_mode()
    def admit(self, prompts: list[list[int]], budgets: list[int],
              segments: list[list[tuple[int, int]]] | None = None) -> list[int]:
        """Prefill ``prompts`` and add them to the batch; returns their handles. ``segments`` gives each prompt's
        retrieved chunks as token ranges (``chunk_cache.chunk_segments``; [] for none): with a chunk cache their KV
        is reused wherever they appear."""
        handles = list(range(self._next, self._next + len(prompts)))
        self._next += len(prompts)
        self.budget.update(zip(handles, budgets))
        left = [self.budget[h] - n for h, n in zip(self.rows.ids.tolist(), self.rows.n_out.tolist())] \
            if self.rows is not None else []
        room = max(left + budgets)  # for the longest budget still to run
        by_handle = dict(zip(handles, prompts))
        starts = {h: self.prompt_cache.match(p) if self.prompt_cache is not None else (0, None)
                  for h, p in by_handle.items()}
        if self.chunk_cache is not None and segments:
            chunked = {h: s for h, s in zip(handles, segments) if s and starts[h][0] < s[-1][1]}
            starts.update(self._chunk_starts({h: by_handle[h] for h in chunked}, chunked))
        rest = {h: p[starts[h][0]:] for h, p in by_handle.items()}
        for group in self._groups(rest):
            self._prefill_group(group, starts, by_handle, room)
        return handles

    def _groups(self, rest: dict[int, list[int]]) -> list[dict[int, list[int]]]:
        return length_groups(rest) if self.device.type == "cpu" else [rest]

    def _chunk_starts(self, prompts: dict[int, list[int]], segments: dict[int, list[tuple[int, int]]]) -> dict:
        """Each prompt's start assembled from its head's and its chunks' KV (``chunk_cache.assemble``), after
        computing, in one forward per length group, the chunks not cached yet, each after its prompt's head alone."""
        cache = self.chunk_cache
        found: dict[tuple, tuple] = {}
        todo: dict[tuple, list[int]] = {}
        for h, segs in segments.items():
            head = prompts[h][:segs[0][0]]
            for a, b in segs:
                key = (tuple(head), tuple(prompts[h][a:b]))
                if key not in found and key not in todo:
                    entry = cache.get(key)
                    if entry is None:
                        todo[key] = head + prompts[h][a:b]
                    else:
                        found[key] = entry
        keys = list(todo)
        starts = {i: self.prompt_cache.match(todo[key]) if self.prompt_cache is not None else (0, None)
                  for i, key in enumerate(keys)}
        rest = {i: todo[key][starts[i][0]:] for i, key in enumerate(keys)}
        for group in self._groups(rest):
            new = self._prefill(group, starts)
            for row, i in enumerate(group):
                head, chunk = keys[i]
                found[keys[i]] = cache.add(list(head), list(chunk), _row_kv(new, row))
        return {h: assemble(self.model, prompts[h], segs, cache.heads[tuple(prompts[h][:segs[0][0]])], found)
                for h, segs in segments.items()}

    def _prefill_group(self, group: dict[int, list[int]], starts: dict[int, tuple], prompts: dict[int, list[int]],
                       room: int) -> None:
        """Prefill one group (by handle, the tokens after each prompt's cached start), keep the whole ``prompts``' KV
        in the prompt cache, and add their rows to the batch. What the cache leaves to run is often a few tokens: those
        read the quantized weights, as a decode step does."""
        new = self._prefill(group, starts)
        if self.prompt_cache is not None:
            for row, handle in enumerate(group):
                self.prompt_cache.add(prompts[handle], _row_kv(new, row))
        self.rows = _merge(self.rows, new, room)

    def _prefill(self, group: dict, starts: dict) -> _Rows:
        """One forward over ``group`` (each row's tokens after its start), counted in ``prefilled``."""
        tokens = sum(len(p) for p in group.values())
        self.prefilled["tokens"] += tokens
        self.prefilled["padding"] += len(group) * max(len(p) for p in group.values()) - tokens
        return prefill_after_starts(self.model, group, starts, self.pad_id, self.prefix, self.device, self.quant)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """Sample each live row's next token: (handle, token) pairs. Then ``advance`` with the rows now done."""
        return self.choose(_sample(self.rows.logits, self.temperature, self.top_p, None))

    def choose(self, tok: torch.Tensor) -> list[tuple[int, int]]:
        """Take ``tok`` (one token per row, in the rows' order) as the rows' next tokens: what ``step`` does after
        sampling, and what a fused decode (``fused.FusedStream``) does with tokens chosen from several streams."""
        rows = self.rows
        live = ~rows.done
        rows.n_out += live.long()
        self._tok = tok
        return [(h, t) for h, t, on in zip(rows.ids.tolist(), tok.tolist(), live.tolist()) if on]

    @torch.inference_mode()
    def advance(self, finished: set[int]) -> None:
        """Mark ``finished`` handles (and rows at their budget) done, drop them once a quarter of the batch has
        finished, and run the next forward step for the rows still live."""
        rows = self.rows
        ids, n_out = rows.ids.tolist(), rows.n_out.tolist()
        for i, (h, n) in enumerate(zip(ids, n_out)):
            if h in finished or n >= self.budget[h]:
                rows.done[i] = True
        tok = self._tok
        if int(rows.done.sum()) * 4 >= len(ids):
            for h in rows.ids[rows.done].tolist():
                self.budget.pop(h, None)
            tok, self.rows = tok[~rows.done], rows.keep(~rows.done)
            rows = self.rows
            if len(rows.ids) == 0:
                self.rows = None
                return
        tok = torch.where(rows.done, torch.full_like(tok, self.pad_id), tok)
        rows.logits = _step(self.model, tok[:, None], rows.next_pos[:, None], rows.caches, rows.col,
                            rows.key_mask, self.prefix, self.quant)
        rows.next_pos = rows.next_pos + 1
        rows.col += 1
