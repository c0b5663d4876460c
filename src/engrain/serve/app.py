"""``engrain serve``: an OpenAI-compatible HTTP API where every memory of a workspace is a model, and a playground.

Routes (``/v1/*`` and the playground's data need the API key when one is set):

    GET  /v1/models                 the base model and every memory that opens, as ``<workspace>:<memory>``
    GET  /v1/models/{id}
    POST /v1/chat/completions       OpenAI chat completions; ``stream: true`` sends server-sent events
    POST /v1/completions            OpenAI (legacy) completions
    GET  /health                    liveness, queue length, memory use (no key needed)
    GET  /                          the playground page (static, no data in it)
    GET  /engrain/info              what the playground shows: models and the latest report
    GET  /reports/latest            the newest WS/reports/*/report.html (found by listing, read-only)

Every response of a completion carries an extra object ``engrain``: ``{"memory", "chunks", "latency_ms",
"queue_ms", "batch_size"}``; ``chunks`` are the ids of the retrieved chunks put in the prompt (rag memories;
empty otherwise). In a stream it is on the chunk that carries ``finish_reason``.

Prompts: base and trained memories read the whole conversation through the model's chat template (engrain's
system prompt is added when the request has none); ``context`` and ``rag`` memories answer the LAST user
message with the documents or retrieved chunks, exactly as ``engrain ask``/``compare`` prompt them. On
``/v1/completions`` the prompt is raw text for base/trained memories and the question for context/rag ones.
Decoding is greedy unless ``temperature`` > 0.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad JSON / bad field /
``max_tokens`` over the limit / prompt over the model's window (``context_length_exceeded``), 401 missing or
wrong key, 404 unknown model or route, 413 body over the size limit, 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import signal
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngrainError
from .engine import Engine, Served
from .scheduler import Job, Scheduler, ShuttingDown

MAX_BODY_BYTES = 64 * 1024
MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_TOKENS = 128


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """A server reachable beyond this machine must ask for a key."""
    if not is_loopback(host) and not api_key:
        raise EngrainError(f"Refusing to listen on {host} without an API key: anyone who can reach this machine "
                           "could use the models and read the workspace's documents through them.",
                           hint="Pass --api-key KEY (or set ENGRAIN_API_KEY), or listen on 127.0.0.1.")


# ------------------------------------------------------------------------------------------------------
# Request bodies
# ------------------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(max_length=200)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    n: int = 1
    ignore_eos: bool = False  # as in vLLM: keep generating to max_tokens (load tests)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[str]


def _text_of(content) -> str:
    """A message's text: a string, or the text parts of OpenAI's content array."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "Only text content parts are supported.", param="messages")
        parts.append(part["text"])
    return "".join(parts)


# ------------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------------


def create_app(engine: Engine, scheduler: Scheduler, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_tokens_limit: int = MAX_TOKENS_LIMIT,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, reports_dir: Path | None = None):
    reports_dir = reports_dir or engine.ws.reports_dir
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and waited for open requests; finish whatever is still queued.
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="engrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler = engine, scheduler

    def err(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
            code: str | None = None, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return err(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return err(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return err(400, "Invalid request.", code="invalid_request")

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY'.", type_="authentication_error",
                           code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key.", type_="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"The request body is over the limit of {max_body_bytes} bytes.",
                           code="request_too_large")
        body = bytearray()
        async for piece in request.stream():  # counted as it arrives: a missing or false length does not help
            body += piece
            if len(body) > max_body_bytes:
                raise ApiError(413, f"The request body is over the limit of {max_body_bytes} bytes.",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return data

    def parse(cls, data: dict):
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            raise ApiError(400, f"Invalid '{param}': {first.get('msg')}.", param=param, code="invalid_value") from exc

    def lookup(model_id: str) -> Served:
        served = engine.get(model_id)
        if served is None:
            shown = model_id if len(model_id) <= 80 else model_id[:80] + "..."
            raise ApiError(404, f"The model '{shown}' does not exist. Available: "
                                f"{', '.join(engine.served)}.", param="model", code="model_not_found")
        return served

    def common(body: _Body) -> dict:
        if body.n != 1:
            raise ApiError(400, "Only n=1 is supported.", param="n", code="invalid_value")
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
        if max_tokens < 1 or max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens must be between 1 and {max_tokens_limit} on this server, not "
                                f"{max_tokens}.", param="max_tokens", code="invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 64 for s in stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings of up to 64 characters.", param="stop",
                           code="invalid_value")
        return dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                    ignore_eos=body.ignore_eos)

    def too_long(n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > engine.max_context:
            raise ApiError(400, f"This model's maximum context length is {engine.max_context} tokens; the prompt "
                                f"takes {n_prompt} and max_tokens asks for {max_tokens}. Shorten the prompt or "
                                "lower max_tokens.", param="messages", code="context_length_exceeded")

    def make_job(served: Served, opts: dict, *, messages: list[dict] | None = None, prompt: str | None = None) -> Job:
        job = Job(served=served, emit=lambda ev: None, **opts)
        if served.layout == "chat":
            job.prompt_ids = engine.chat_ids(messages) if messages is not None else engine.encode(prompt)
            too_long(len(job.prompt_ids), job.max_tokens)
            return job
        if messages is not None:
            users = [_text_of(m["content"]) for m in messages if m["role"] == "user"]
            if not users or not users[-1].strip():
                raise ApiError(400, f"The '{served.memory}' memory answers the last user message; there is none.",
                               param="messages", code="invalid_value")
            question = users[-1]
        else:
            question = prompt
        if not question.strip():
            raise ApiError(400, "The prompt is empty.", param="prompt", code="invalid_value")
        if served.layout == "context":
            prefix, job.prompt_ids = engine.context_ids(question)
            too_long(len(prefix) + len(job.prompt_ids), job.max_tokens)
        else:  # rag: retrieval happens in the worker, batched; here only what cannot fit at all is refused
            job.question = question
            too_long(engine.bare_rag_tokens(question), job.max_tokens)
        return job

    async def run(job: Job, body: _Body, kind: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        job.emit = emit
        try:
            scheduler.submit(job)
        except ShuttingDown:
            raise ApiError(503, "The server is shutting down.", type_="server_error", code="shutting_down")
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        settled = False  # True once the job's outcome is owned by a response (or it has ended)
        try:
            first = await events.get()
            if first["type"] == "error":
                settled = True
                raise ApiError(first["status"], first["message"], code=first.get("code"),
                               type_="server_error" if first["status"] >= 500 else "invalid_request_error")
            if body.stream:
                settled = True  # from here the stream's own clean-up cancels the job if the client leaves
                return StreamingResponse(_stream(job, events, first, rid, created, kind, body),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, end = [], None
            while end is None:
                ev = await events.get()
                if ev["type"] == "delta":
                    text.append(ev["text"])
                elif ev["type"] == "error":
                    settled = True
                    raise ApiError(ev["status"], ev["message"], type_="server_error", code=ev.get("code"))
                elif ev["type"] == "done":
                    end = ev
            settled = True
            return JSONResponse(_final(rid, created, job, first, end, "".join(text), kind))
        finally:
            if not settled:
                job.cancelled = True  # the request was abandoned while waiting: free its row

    # --------------------------------------------------------------------------------------------------
    # Routes
    # --------------------------------------------------------------------------------------------------

    def model_card(s: Served) -> dict:
        return {"id": s.model_id, "object": "model", "created": started, "owned_by": "engrain",
                "engrain": {"memory": s.memory, "layout": s.layout, **s.info}}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(s) for s in engine.models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        authorize(request)
        return model_card(lookup(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse(ChatBody, await read_json(request))
        served = lookup(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content)}
                    for m in body.messages]
        return await run(make_job(served, common(body), messages=messages), body, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = parse(CompletionBody, await read_json(request))
        served = lookup(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "Send one prompt per request.", param="prompt", code="invalid_value")
            prompt = prompt[0]
        return await run(make_job(served, common(body), prompt=prompt), body, "text")

    @app.get("/health")
    async def health():
        import psutil

        return {"status": "draining" if scheduler.closing else "ok", "models": len(engine.served),
                "queue": scheduler.pending(), "auth": bool(api_key),
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                "weights_mb": round(engine.weight_bytes() / 2**20, 1), **scheduler.stats}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("engrain.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/engrain/info")
    async def info(request: Request):
        authorize(request)
        report = latest_report(reports_dir)
        return {"workspace": engine.prefix, "models": [model_card(s) for s in engine.models()],
                "skipped": engine.skipped,
                "report": {"name": report.parent.name, "url": "/reports/latest"} if report else None}

    @app.get("/reports/latest")
    async def report_latest(request: Request):
        authorize(request)
        report = latest_report(reports_dir)
        if report is None:
            raise ApiError(404, "There is no comparison report yet: run engrain compare.", code="not_found")
        return HTMLResponse(report.read_text(encoding="utf-8", errors="replace"))

    return app


async def _stream(job: Job, events: asyncio.Queue, start: dict, rid: str, created: int, kind: str, body: _Body):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    finished = False
    try:
        yield _sse(_chunk(rid, created, job, kind, role=True))
        while True:
            ev = await events.get()
            if ev["type"] == "delta":
                yield _sse(_chunk(rid, created, job, kind, text=ev["text"]))
            elif ev["type"] == "error":
                yield _sse(error_body(ev["message"], "server_error", None, ev.get("code")))
                break
            elif ev["type"] == "done":
                last = _chunk(rid, created, job, kind, finish=ev["finish_reason"])
                last["engrain"] = _extra(job, start, ev)
                yield _sse(last)
                if include_usage:
                    usage = _chunk(rid, created, job, kind)
                    usage["choices"] = []
                    usage["usage"] = _usage(start, ev)
                    yield _sse(usage)
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            job.cancelled = True  # the client went away mid-stream: stop its row


def latest_report(reports_dir: Path) -> Path | None:
    """The newest ``<reports>/<name>/report.html``, found by listing the folder (no request reaches a path)."""
    if not reports_dir.is_dir():
        return None
    found = [d / "report.html" for d in reports_dir.iterdir() if d.is_dir() and (d / "report.html").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


# ------------------------------------------------------------------------------------------------------
# Response shapes
# ------------------------------------------------------------------------------------------------------


def _usage(start: dict, end: dict) -> dict:
    return {"prompt_tokens": start["prompt_tokens"], "completion_tokens": end["completion_tokens"],
            "total_tokens": start["prompt_tokens"] + end["completion_tokens"]}


def _extra(job: Job, start: dict, end: dict) -> dict:
    return {"memory": job.served.memory, "chunks": start["chunks"], "latency_ms": end["latency_ms"],
            "queue_ms": start["queue_ms"], "batch_size": start["batch_size"]}


def _final(rid: str, created: int, job: Job, start: dict, end: dict, text: str, kind: str) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": end["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end["finish_reason"]}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": job.served.model_id, "choices": [choice],
            "usage": _usage(start, end), "engrain": _extra(job, start, end)}


def _chunk(rid: str, created: int, job: Job, kind: str, *, text: str | None = None, role: bool = False,
           finish: str | None = None) -> dict:
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


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------------
# Running it
# ------------------------------------------------------------------------------------------------------


def build(ws_root: Path | str, model_spec: str | None = None, *, device: str | None = None, max_batch: int = 8,
          log=None) -> tuple[Engine, Scheduler]:
    """Load the model and every memory of the workspace, and start the worker."""
    from ..models import load_model
    from ..workspace import Workspace

    ws = Workspace.at(ws_root)
    if not ws.root.is_dir():
        raise EngrainError(f"The workspace {ws.root} does not exist.",
                           hint="Create one first: engrain ingest DOCS_DIR -w WORKSPACE")
    lm = load_model(model_spec, device=device)
    engine = Engine(ws, lm, log=log)
    return engine, Scheduler(engine, max_batch=max_batch)


def serve(ws_root: Path | str, model_spec: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 8, max_tokens_limit: int = MAX_TOKENS_LIMIT,
          log=print) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM: open requests and queued jobs are finished first)."""
    import uvicorn

    api_key = api_key or None
    check_bind(host, api_key)  # before loading anything: a refused start should be instant
    engine, scheduler = build(ws_root, model_spec, max_batch=max_batch, log=log)
    app = create_app(engine, scheduler, api_key=api_key, max_tokens_limit=max_tokens_limit)
    for s in engine.models():
        log(f"engrain serve: {s.model_id}")
    for name, why in engine.skipped.items():
        log(f"engrain serve: not serving {name}: {why}")
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60,
                            access_log=False)
    # uvicorn handles SIGTERM itself (stop accepting, finish open requests, run our drain), then raises the signal
    # again for the previous handler; a no-op there lets a terminated server exit 0 after that clean shutdown.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    scheduler.close()
    log(f"engrain serve: stopped after {scheduler.stats['jobs']} requests")
