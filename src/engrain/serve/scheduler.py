"""The request queue and the one worker thread that runs the model.

Requests arrive from many HTTP handlers at once; each becomes a ``Job`` in one queue. The worker takes the oldest job
and every queued job on the same weights with the same prompt layout and sampling (up to ``max_batch``; never two
adapters in one pass) and decodes them together: continuously batched (``models/stream.py``: queued jobs of the same
key join as rows finish), or, for context prompts and ``ignore_eos``, in one batched ``generate``. Tokens go back to
each request as they are made; a row stops at its own ``max_tokens``, end-of-turn token or stop string, or when its
client went away. Shutdown: ``close()`` refuses new jobs, lets the worker finish every queued and running job, then
joins it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from ..errors import EngrainError
from ..models import stop_token_ids
from ..models.chunk_cache import ChunkCache, chunk_segments
from ..models.prompt_cache import PromptCache
from ..models.prompts import render_chunks
from .engine import Engine, Served


class ShuttingDown(Exception):
    """Raised by ``submit`` once the scheduler is closing."""


@dataclass
class Job:
    served: Served
    emit: Callable[[dict], None]  # thread-safe: hands one event to the waiting request
    max_tokens: int
    prompt_ids: list[int] | None = None  # chat layout: the whole prompt; context layout: the question's suffix
    question: str | None = None  # rag layout: retrieval and the prompt are done by the worker
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    cancelled: bool = False  # set by the request when its client disconnects
    submitted: float = field(default_factory=time.perf_counter)
    chunks: list[str] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)  # rag: the chunks' token ranges (reuse_chunks)
    gated_to_base: bool = False  # a trained memory's relevance gate sent this question to the base weights
    closed_ids: list[int] | None = None  # a fused hybrid (rag.hybrid fused): the question's prompt without chunks

    @property
    def weights(self) -> str:
        """The weights this job runs on: its memory's, or the base model's when the gate refused the question."""
        return "base" if self.gated_to_base else self.served.weights

    @property
    def fused(self) -> bool:
        """A fused hybrid's question (rag.hybrid fused, as the engine serves it), not one its gate refused."""
        return self.served.info.get("hybrid") == "fused" and not self.gated_to_base

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a forward pass."""
        layout = "context" if self.served.layout == "context" else "fused" if self.fused else "plain"
        return self.weights, layout, round(self.temperature, 4), round(self.top_p, 4), self.ignore_eos


class _Row:
    """One job's decoding state inside a batch."""

    def __init__(self, job: Job, tokenizer, stop_ids: set[int]) -> None:
        self.job = job
        self.tok = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.sent = 0  # characters of the visible text already emitted
        self.done = False
        self.hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming

    def push(self, token: int) -> None:
        if self.done:
            return
        if self.job.cancelled:
            self.done = True
            return
        if token in self.stop_ids and not self.job.ignore_eos:
            self.finish("stop")
            return
        self.ids.append(token)
        text = self.text()
        for s in self.job.stop:
            at = text.find(s)
            if at >= 0:
                self._emit_upto(text[:at].rstrip(), final=True)
                self._done("stop")
                return
        if len(self.ids) >= self.job.max_tokens:
            self.finish("length")
            return
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            safe = min(safe, len(text) - 1)
        self._emit_upto(text[:max(safe, self.sent)], final=False)

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True).lstrip()

    def finish(self, reason: str) -> None:
        if not self.done:
            self._emit_upto(self.text().rstrip(), final=True)
            self._done(reason)

    def _emit_upto(self, visible: str, final: bool) -> None:
        if len(visible) > self.sent:
            self.job.emit({"type": "delta", "text": visible[self.sent:]})
            self.sent = len(visible)

    def _done(self, reason: str) -> None:
        self.done = True
        now = time.perf_counter()
        self.job.emit({"type": "done", "finish_reason": reason, "completion_tokens": len(self.ids),
                       "latency_ms": round((now - self.job.submitted) * 1000, 1)})


class _BatchStreamer:
    """``generate``'s streamer: the first ``put`` is the prompt, then one token per row per step."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.push(int(token))

    def end(self) -> None:
        for row in self.rows:
            row.finish("length")


def _stopping(rows: list[_Row], width: int):
    """Per-row stop: its own max_tokens reached, or already finished (stop string, cancelled)."""
    import torch
    from transformers import StoppingCriteria

    class RowsDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            n = input_ids.shape[1] - width
            return torch.tensor([r.done or r.job.cancelled or n >= r.job.max_tokens for r in rows],
                                dtype=torch.bool, device=input_ids.device)

    return RowsDone()


def _summed(caches: dict, keys: tuple[str, ...]) -> dict[str, int]:
    """``keys`` of the caches' stats, summed over every served model's cache."""
    total = dict.fromkeys(keys, 0)
    for cache in list(caches.values()):  # a copy: the worker may add a cache meanwhile
        for key in keys:
            total[key] += cache.stats[key]
    return total


class Scheduler:
    """One queue, one worker thread, batches of same-weights jobs."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, reuse_chunks: bool = False) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.reuse_chunks = reuse_chunks  # retrieved chunks' KV reused wherever they come back (chunk_cache.py)
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.paused = False  # tests hold the worker to queue jobs deterministically
        self.running = 0  # jobs in the batch being generated
        self.stats = {"batches": 0, "jobs": 0, "max_batch_seen": 0, "errors": 0}
        # Where the worker's time goes, in seconds since start (``worker_seconds``): retrieval and prompts made
        # (rag), prefill (admitting rows), decode steps, and every batch's whole time ("busy"; waiting not counted).
        self.seconds = dict.fromkeys(("retrieval", "prefill", "decode", "busy"), 0.0)
        # What those prefill seconds computed: requests admitted, their tokens through a forward (after reused KV)
        # and the padding beside them, over every reading of a fused hybrid (``/health``'s ``prefill_tokens``)
        self.prefilled = dict.fromkeys(("requests", "tokens", "padding"), 0)
        self.batch_log: deque[tuple[str, int]] = deque(maxlen=256)  # (weights, batch size), most recent last
        self.stop_ids = set(stop_token_ids(engine.tokenizer))
        self.prompt_caches: dict[str, PromptCache] = {}  # weights name -> its recent prompts' KV (prompt_cache.py)
        self.chunk_caches: dict[str, ChunkCache] = {}  # weights name -> its retrieved chunks' KV (reuse_chunks)
        self.thread = threading.Thread(target=self._loop, name="engrain-serve-worker", daemon=True)
        self.thread.start()

    # ---------------------------------------------------------------------------------------------
    # Queue
    # ---------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closing:
                raise ShuttingDown()
            self.queue.append(job)
            self.cond.notify()

    def pause(self) -> None:
        with self.cond:
            self.paused = True

    def resume(self) -> None:
        with self.cond:
            self.paused = False
            self.cond.notify()

    def pending(self) -> int:
        with self.cond:
            return len(self.queue) + self.running

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued and running ones, stop the worker."""
        with self.cond:
            self.closing = True
            self.paused = False
            self.cond.notify_all()
        self.thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.queue or self.paused:
                if self.closing and not self.queue:
                    return None
                self.cond.wait()
            key = self.queue[0].key
            limit = self.max_batch
            if self.queue[0].served.layout == "context":
                limit = min(limit, self.engine.context.cache_rows())
            batch, rest = [], deque()
            while self.queue:
                job = self.queue.popleft()
                (batch if job.key == key and len(batch) < limit else rest).append(job)
            self.queue = rest
            self.running = len(batch)
            return batch

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Adds the block's time to ``seconds[part]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - t0

    def worker_seconds(self) -> dict[str, float]:
        """The worker's seconds by part since start; "other" is the rest of its batches' time (tokens emitted, the
        ``generate`` path, a batch still running)."""
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, out["busy"] - out["retrieval"] - out["prefill"] - out["decode"]), 3)
        return out

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            t0 = time.perf_counter()
            try:
                self._run(batch)
            except Exception as exc:  # a failure is the batch's, never the server's
                self.stats["errors"] += 1
                for job in batch:
                    job.emit({"type": "error", "status": 500, "message": f"generation failed: {exc}",
                              "code": "generation_failed"})
            finally:
                self.seconds["busy"] += time.perf_counter() - t0
                with self.cond:
                    self.running = 0

    # ---------------------------------------------------------------------------------------------
    # One batch
    # ---------------------------------------------------------------------------------------------

    def _run(self, batch: list[Job]) -> None:
        """Generate for one batch: prompts made, start events sent, then the fast loop (``_stream``) where it
        applies, else one batched ``generate`` streaming to each row."""
        import torch

        from ..models import fastgen

        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        started = time.perf_counter()  # queueing ends here; retrieval is part of the answer's time
        batch = self._fit_rag_prompts(batch)
        if not batch:
            return
        engine = self.engine
        weights = batch[0].weights
        with engine.weights(weights) as module, torch.inference_mode():
            if batch[0].served.layout != "context" and not batch[0].ignore_eos and fastgen.supports(module):
                self._stream(module, batch, started)
                return
            # generate() runs one model, so a fused hybrid's request that ignores EOS reads the chunks with the memory
            self._started(batch, len(batch), started)
            ids, mask = self._inputs(batch)
            rows = [_Row(j, engine.tokenizer, self.stop_ids) for j in batch]
            kwargs = self._generate_kwargs(batch, rows, ids.shape[1])
            self._count(weights, len(batch))
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
            module.generate(input_ids=ids.to(engine.lm.device), attention_mask=mask.to(engine.lm.device), **kwargs)
        for row in rows:  # generate may end a step early for rows the criteria stopped
            row.finish("length")

    def _stream(self, module, batch: list[Job], started: float) -> None:
        """Continuous batching: the rows decode together; once a quarter of them have finished, queued jobs of
        the same key take their places (``_join``), so a new request waits for a few tokens, not a whole batch."""
        first = batch[0]
        stream = self._open_stream(module, first)
        rows: dict[int, _Row] = {}
        total = 0
        while batch:
            prompts = [j.prompt_ids for j in batch]
            if first.fused:  # one prompt per reading: with the chunks, then the memory's and the base's closed-book
                closed = [j.closed_ids for j in batch]
                prompts = [prompts, closed, closed]
            before = dict(stream.prefilled)
            with self._timed("prefill"):
                handles = stream.admit(prompts, [j.max_tokens for j in batch], [j.segments for j in batch])
            self.prefilled["requests"] += len(batch)
            for k, n in stream.prefilled.items():
                self.prefilled[k] += n - before[k]
            self._started(batch, len(stream), started)
            rows.update((h, _Row(j, self.engine.tokenizer, self.stop_ids)) for h, j in zip(handles, batch))
            total += len(batch)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(stream))
            try:
                batch, started = self._decode(stream, rows, first.key)
            except Exception as exc:  # the stream's failure: every row still running gets it (joined ones too)
                self.stats["errors"] += 1
                for row in rows.values():
                    if not row.done:
                        row.done = True
                        row.job.emit({"type": "error", "status": 500, "message": f"generation failed: {exc}",
                                      "code": "generation_failed"})
                batch = []
        self._count(first.weights, total)

    def _open_stream(self, module, first: Job):
        """The decode stream for a batch like ``first``: one ``Stream`` on ``module``, or for a fused hybrid a
        ``FusedStream`` of three (the base model reading the chunks, the memory and the base model closed-book)."""
        from ..models.stream import Stream

        def one(model, weights: str) -> Stream:
            chunks = self.chunk_caches.setdefault(weights, ChunkCache()) if self.reuse_chunks else None
            return Stream(model, pad_id=self.engine.tokenizer.pad_token_id, temperature=first.temperature,
                          top_p=first.top_p, prompt_cache=self.prompt_caches.setdefault(weights, PromptCache()),
                          chunk_cache=chunks)

        if not first.fused:
            return one(module, first.weights)
        from ..models.fused import FusedStream

        base, w = self.engine.lm.model, self.engine.rag.config.fused_weight  # fuses(): no adapter in the base model
        return FusedStream([one(base, "base"), one(module, first.weights), one(base, "base")], [1.0, w, -w],
                           temperature=first.temperature, top_p=first.top_p)

    def prompt_cache_stats(self) -> dict:
        """Prompt lookups, hits and tokens whose prefill a cached prompt's KV saved, over every served model."""
        total = _summed(self.prompt_caches, ("lookups", "hits", "tokens_reused"))
        if self.reuse_chunks:
            total["chunk_kv"] = _summed(self.chunk_caches, ("chunks", "chunk_hits", "tokens_reused"))
        return total

    def _decode(self, stream, rows: dict[int, _Row], key: tuple) -> tuple[list[Job], float]:
        """Steps until the stream is empty (returns no jobs) or queued jobs join it (returns them, and when their
        queueing ended)."""
        while len(stream):
            with self._timed("decode"):
                chosen = stream.step()
            for handle, token in chosen:
                rows[handle].push(token)
            done = {h for h, row in rows.items() if row.done or row.job.cancelled}
            with self._timed("decode"):
                stream.advance(done)
            for h in done:
                rows.pop(h).finish("length")  # a no-op for rows that already finished
            if len(stream) * 4 <= self.max_batch * 3:
                started = time.perf_counter()
                if joined := self._join(key, len(stream)):
                    return joined, started
        return [], 0.0

    def _join(self, key: tuple, live: int) -> list[Job]:
        """Queued jobs that may join a running stream of ``key``: only while the oldest queued job has that key
        (so another memory's requests are not passed over for long), up to the free rows, rag prompts fitted."""
        rag = self.engine.rag
        asks_model = rag is not None and (rag.config.rewrite_query or rag.config.draft_query)
        with self.cond:
            if not self.queue or self.paused or self.queue[0].key != key:
                return []
            take, rest = [], deque()
            while self.queue:
                job = self.queue.popleft()
                fits = len(take) + live < self.max_batch and not (asks_model and job.question is not None)
                (take if job.key == key and fits else rest).append(job)
            self.queue = rest
            self.running = live + len(take)
        return self._fit_rag_prompts([j for j in take if not j.cancelled])

    def _started(self, batch: list[Job], size: int, started: float) -> None:
        for job in batch:
            job.emit({"type": "start", "prompt_tokens": self._prompt_tokens(job), "chunks": job.chunks,
                      "queue_ms": round((started - job.submitted) * 1000, 1), "batch_size": size})

    def _count(self, weights: str, jobs: int) -> None:
        """Statistics: one batch (or stream) of ``jobs`` requests run on ``weights``."""
        self.stats["batches"] += 1
        self.stats["jobs"] += jobs
        self.batch_log.append((weights, jobs))

    def _fit_rag_prompts(self, batch: list[Job]) -> list[Job]:
        """rag jobs: one batched retrieval for all their questions, then each prompt fitted to the window (a job
        that cannot fit gets its error and leaves the batch). Returns the jobs still to run."""
        rag_jobs = [j for j in batch if j.question is not None]  # a gated hybrid's refused ones are closed-book
        if not rag_jobs:
            return batch
        with self._timed("retrieval"):
            self._fit_rag_jobs(rag_jobs)
        return [j for j in batch if not j.cancelled]

    def _fit_rag_jobs(self, rag_jobs: list[Job]) -> None:
        """Retrieval for ``rag_jobs`` and their prompts (``job.prompt_ids``); a job whose prompt cannot fit is
        cancelled after its error."""
        rag = self.engine.rag
        questions = [j.question for j in rag_jobs]
        # Query rewriting uses the base model, drafts the jobs' own weights (a hybrid's memory names what it
        # learned); neither is asked for inside a running stream (see _join).
        drafts = None
        if rag.config.draft_query:
            with self.engine.weights(rag_jobs[0].weights) as module:  # a merged LoRA is a module of its own
                drafts = rag.drafts(questions, max(j.max_tokens for j in rag_jobs), "chat",
                                    lm=replace(self.engine.lm, model=module))
        with self.engine.weights("base") if rag.config.rewrite_query else nullcontext():
            hits = rag.retriever.retrieve(questions, rag.config.top_k, drafts)
        for job, job_hits in zip(rag_jobs, hits):
            try:
                prompt, kept, _ = rag.fit_prompt(job.question, job_hits, job.max_tokens)
            except EngrainError as exc:
                job.emit({"type": "error", "status": 400, "message": exc.message, "code": "context_length_exceeded"})
                job.cancelled = True
                continue
            job.chunks = [h.chunk_id for h in kept]
            if job.fused and not job.ignore_eos:  # the closed-book readings (ignore_eos reads: see _run)
                job.closed_ids = self.engine.bare_rag_ids(job.question)
            if self.reuse_chunks:
                enc = self.engine.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
                job.prompt_ids = enc["input_ids"]
                pieces = [render_chunks([(h.chunk_id, h.text)]) for h in kept]
                job.segments = chunk_segments(enc["offset_mapping"], prompt, pieces)
            else:
                job.prompt_ids = self.engine.encode(prompt)

    def _inputs(self, batch: list[Job]):
        """Input ids and attention mask: the rows left-padded to one width, after the shared documents for context."""
        import torch

        pad = self.engine.tokenizer.pad_token_id
        prefix = self.engine.context.prefix_ids if batch[0].served.layout == "context" else []
        P = len(prefix)
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), P + width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        if P:
            ids[:, :P] = torch.tensor(prefix)
            mask[:, :P] = 1
        for r, job in enumerate(batch):
            # Left padding; for context the pads sit between the shared documents and the question, and
            # position ids (from the mask) skip them, as ContextMemory does.
            n = len(job.prompt_ids)
            ids[r, P + width - n:] = torch.tensor(job.prompt_ids)
            mask[r, P + width - n:] = 1
        return ids, mask

    def _generate_kwargs(self, batch: list[Job], rows: list[_Row], width: int) -> dict:
        """``generate``'s settings for the batch: the longest budget, its sampling, the streamer and row stops."""
        first = batch[0]
        kwargs = dict(max_new_tokens=max(j.max_tokens for j in batch), eos_token_id=sorted(self.stop_ids),
                      pad_token_id=self.engine.tokenizer.pad_token_id, streamer=_BatchStreamer(rows),
                      stopping_criteria=[_stopping(rows, width)])
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if first.ignore_eos:
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]  # end-of-turn tokens masked until the budget
        if first.served.layout == "context":
            kwargs["cache"] = self.engine.context.batch_cache(len(batch))
        return kwargs

    def _prompt_tokens(self, job: Job) -> int:
        n = len(job.prompt_ids or [])
        return n + (len(self.engine.context.prefix_ids) if job.served.layout == "context" else 0)
