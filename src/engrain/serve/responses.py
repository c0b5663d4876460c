"""The shapes ``engrain serve`` answers in: OpenAI's completion objects, whole or as server-sent event chunks, each
with engrain's extra object ``engrain`` (which memory answered, the chunks it read, timings)."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from .scheduler import Job
from .validation import error_body


def usage(start: dict, end: dict) -> dict:
    """OpenAI's token counts, from the job's start and done events."""
    return {"prompt_tokens": start["prompt_tokens"], "completion_tokens": end["completion_tokens"],
            "total_tokens": start["prompt_tokens"] + end["completion_tokens"]}


def engrain_extra(job: Job, start: dict, end: dict) -> dict:
    """The ``engrain`` object: the memory, the weights that answered (a trained memory's gate may send a question
    to the base weights), the retrieved chunks' ids, latency, queueing and batch size."""
    return {"memory": job.served.memory, "weights": job.weights, "chunks": start["chunks"], "latency_ms": end["latency_ms"],
            "queue_ms": start["queue_ms"], "batch_size": start["batch_size"]}


def final_response(rid: str, created: int, job: Job, start: dict, end: dict, text: str, kind: str) -> dict:
    """The whole answer as one ``chat.completion`` (``kind`` "chat") or ``text_completion`` object."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": end["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end["finish_reason"]}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": job.served.model_id, "choices": [choice],
            "usage": usage(start, end), "engrain": engrain_extra(job, start, end)}


def chunk(rid: str, created: int, job: Job, kind: str, *, text: str | None = None, role: bool = False,
          finish: str | None = None) -> dict:
    """One streamed chunk: the assistant's role first (chat), then text, then the finish reason."""
    if kind == "chat":
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": job.served.model_id, "choices": [choice]}


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, events: asyncio.Queue, start: dict, rid: str, created: int, kind: str,
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    finished = False
    try:
        yield sse(chunk(rid, created, job, kind, role=True))
        while True:
            ev = await events.get()
            if ev["type"] == "delta":
                yield sse(chunk(rid, created, job, kind, text=ev["text"]))
            elif ev["type"] == "error":
                yield sse(error_body(ev["message"], "server_error", None, ev.get("code")))
                break
            elif ev["type"] == "done":
                last = chunk(rid, created, job, kind, finish=ev["finish_reason"])
                last["engrain"] = engrain_extra(job, start, ev)
                yield sse(last)
                if include_usage:
                    counts = chunk(rid, created, job, kind)
                    counts["choices"] = []
                    counts["usage"] = usage(start, ev)
                    yield sse(counts)
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancelled = True  # the client went away mid-stream: stop its row
