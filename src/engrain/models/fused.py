"""Greedy answers decoded from several readings of one question at once: at every step the next token is the argmax
of a weighted sum of each reading's log-probabilities.

A hybrid (``lora+rag``) with ``rag.hybrid: fused`` reads a question three ways: the base model with the retrieved
chunks (weight 1), the trained memory closed-book (weight w) and the base model closed-book (weight -w). The last two
together are what training changed about the answer, added to what the untouched model reads in the chunks (the
arithmetic of proxy tuning, Liu et al. 2024). The chunks are read by weights that read well; a fact retrieval missed
comes from the memory. ``experiments/retrieval`` measures it against the memory reading the chunks itself.

Each reading is decoded by ``fastgen``'s prefill and step, so every model keeps its own KV cache, decode weights and
trained prefix; the readings advance in lockstep on the same chosen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import decode_weights
from .fastgen import _merge, _prefill, _sample, _step, decoder, trained_prefix
from .stops import stop_index
from .stream import Stream


@dataclass
class Reading:
    """One way of reading the prompts: a model (a ``LM.model``), its prompt per question and its weight."""

    model: object
    prompts: list[list[int]]
    weight: float


def weighted_log_probs(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The sum of each reading's log-probabilities (rows aligned across readings) times its weight, in fp32."""
    return sum(w * torch.log_softmax(x.float(), dim=-1) for x, w in zip(logits, weights))


@torch.inference_mode()
def fused_tokens(readings: list[Reading], *, max_new_tokens: int, stop_ids: list[int], pad_id: int,
                 batch_size: int = 16) -> list[list[int]]:
    """New tokens per question, greedy on the weighted sum of the readings' log-probabilities; each list ends with
    the stop token when one was produced. Questions run ``batch_size`` at a time, shortest first by the first
    reading's prompt."""
    n = len(readings[0].prompts)
    if any(len(r.prompts) != n for r in readings):
        raise ValueError("every reading needs one prompt per question")
    order = sorted(range(n), key=lambda i: len(readings[0].prompts[i]))
    out: list[list[int]] = [[] for _ in range(n)]
    for start in range(0, n, batch_size):
        ids = order[start:start + batch_size]
        for i, seq in zip(ids, _batch(readings, ids, max_new_tokens, stop_ids, pad_id)):
            out[i] = seq
    return out


def _batch(readings: list[Reading], ids: list[int], max_new_tokens: int, stop_ids: list[int],
           pad_id: int) -> list[list[int]]:
    runs = []
    for r in readings:
        prefix, model = trained_prefix(r.model), decoder(r.model)
        quant = decode_weights.for_model(model)
        device = model.model.embed_tokens.weight.device
        rows = _merge(None, _prefill(model, r.prompts, ids, pad_id, prefix, device, quant=quant), max_new_tokens)
        runs.append((model, prefix, quant, rows))
    # Every reading's model is on one device (``device``, the last reading's): the readings choose one token.
    stop = torch.tensor(stop_ids, device=device)
    tokens = torch.full((len(ids), max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        scores = weighted_log_probs([rows.logits for _, _, _, rows in runs], [r.weight for r in readings])
        tok = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), scores.argmax(dim=-1))
        tokens[:, step] = tok
        done |= torch.isin(tok, stop)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        for model, prefix, quant, rows in runs:
            rows.logits = _step(model, tok[:, None], rows.next_pos[:, None], rows.caches, rows.col, rows.key_mask,
                                prefix, quant)
            rows.next_pos = rows.next_pos + 1
            rows.col += 1
    return [seq[:stop_index(seq, stop_ids) + 1] for seq in tokens.tolist()]  # through the stop token, if any


class FusedStream:
    """The server's fused hybrids: one ``stream.Stream`` per reading, decoded as one. Each request is admitted with a
    prompt per reading; each step chooses one token per request from the weighted sum of the readings'
    log-probabilities (sampled as a single stream samples, or greedy), and every reading takes that token. The
    streams see the same admissions and the same finished requests, so their rows stay the same set."""

    def __init__(self, streams: list[Stream], weights: list[float], *, temperature: float = 0.0,
                 top_p: float = 1.0) -> None:
        self.streams, self.weights, self.temperature, self.top_p = streams, weights, temperature, top_p

    def __len__(self) -> int:
        return len(self.streams[0])

    @property
    def prefilled(self) -> dict[str, int]:
        """Prefill tokens over every reading (``Stream.prefilled``)."""
        return {k: sum(s.prefilled[k] for s in self.streams) for k in ("tokens", "padding")}

    def admit(self, prompts: list[list[list[int]]], budgets: list[int],
              segments: list[list[tuple[int, int]]] | None = None) -> list[int]:
        """``prompts[r]``: reading r's prompt per request. ``segments`` (retrieved chunks' token ranges) are the
        first reading's, the one whose prompts hold the chunks."""
        handles = self.streams[0].admit(prompts[0], budgets, segments)
        for stream, own in zip(self.streams[1:], prompts[1:]):
            if stream.admit(own, budgets) != handles:
                raise RuntimeError("fused streams out of step")
        return handles

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """One token per live request, in the first stream's row order (as ``Stream.step`` gives them)."""
        order = self.streams[0].rows.ids.tolist()
        # Streams admit prompts in groups by their own lengths, so each holds the requests in its own row order.
        positions = [_positions(s, order) for s in self.streams]
        logits = [s.rows.logits[pos] for s, pos in zip(self.streams, positions)]
        tok = _sample(weighted_log_probs(logits, self.weights), self.temperature, self.top_p, None)
        chosen = []
        for stream, pos in zip(self.streams, positions):
            own = torch.empty_like(tok)
            own[pos] = tok  # back to this stream's row order
            chosen.append(stream.choose(own))  # every stream takes the token
        return chosen[0]

    @torch.inference_mode()
    def advance(self, finished: set[int]) -> None:
        for stream in self.streams:
            stream.advance(finished)


def _positions(stream: Stream, handles: list[int]) -> list[int]:
    """Where each of ``handles`` sits among ``stream``'s rows."""
    at = {h: i for i, h in enumerate(stream.rows.ids.tolist())}
    return [at[h] for h in handles]
