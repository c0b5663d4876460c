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
import signal
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngrainError
from .engine import Engine, Served
from .passing_thread import on_passing_thread
from .responses import final_response, stream_events
from .scheduler import Job, Scheduler, ShuttingDown
from .validation import (ApiError, ChatBody, CompletionBody, Limits, RequestBody, chat_messages, error_body,
                         parse, read_json, sampling_options, single_prompt, text_of)

MAX_BODY_BYTES = 64 * 1024
MAX_TOKENS_LIMIT = 512
DEFAULT_MAX_TOKENS = 128


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
# What every route shares, and the steps of a request
# ------------------------------------------------------------------------------------------------------


class Api:
    """The server's state (engine, scheduler, key, limits) and the steps a completion request goes through:
    authorize, look the model up, make its job, queue it and answer."""

    def __init__(self, engine: Engine, scheduler: Scheduler, *, api_key: str | None, limits: Limits,
                 reports_dir: Path) -> None:
        self.engine, self.scheduler = engine, scheduler
        self.api_key = api_key
        self.limits = limits
        self.reports_dir = reports_dir
        self.started = int(time.time())

    def authorize(self, request: Request) -> None:
        """Refuse a request without the right bearer key (when the server has one)."""
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY'.", type_="authentication_error",
                           code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key.", type_="authentication_error", code="invalid_api_key")

    def lookup(self, model_id: str) -> Served:
        """The served memory of that exact name; 404 otherwise (a name is never turned into a path)."""
        served = self.engine.get(model_id)
        if served is None:
            shown = model_id if len(model_id) <= 80 else model_id[:80] + "..."
            raise ApiError(404, f"The model '{shown}' does not exist. Available: "
                                f"{', '.join(self.engine.served)}.", param="model", code="model_not_found")
        return served

    def model_card(self, s: Served) -> dict:
        """A model as ``/v1/models`` lists it, with which memory it is and how its prompt is laid out."""
        return {"id": s.model_id, "object": "model", "created": self.started, "owned_by": "engrain",
                "engrain": {"memory": s.memory, "layout": s.layout, **s.info}}

    def too_long(self, n_prompt: int, max_tokens: int) -> None:
        """Refuse a prompt that, with the answer budget, does not fit the model's window."""
        if n_prompt + max_tokens > self.engine.max_context:
            raise ApiError(400, f"This model's maximum context length is {self.engine.max_context} tokens; the "
                                f"prompt takes {n_prompt} and max_tokens asks for {max_tokens}. Shorten the prompt "
                                "or lower max_tokens.", param="messages", code="context_length_exceeded")

    def make_job(self, served: Served, opts: dict, *, messages: list[dict] | None = None,
                 prompt: str | None = None) -> Job:
        """The job for a conversation (``messages``) or a raw prompt, laid out as the memory reads it."""
        engine = self.engine
        job = Job(served=served, emit=lambda ev: None, **opts)
        if served.weights in engine.gates:  # a trained memory or its hybrid: the gate decides which weights answer
            question = _last_user(messages) if messages is not None else prompt
            job.gated_to_base = bool(question.strip()) and engine.routed_to_base(served, question)
        if served.layout == "chat" or job.gated_to_base:  # a refused hybrid question is asked closed-book
            job.prompt_ids = engine.chat_ids(messages) if messages is not None else engine.encode(prompt)
            self.too_long(len(job.prompt_ids), job.max_tokens)
            return job
        question = _question(served, messages, prompt)
        if served.layout == "context":
            prefix, job.prompt_ids = engine.context_ids(question)
            self.too_long(len(prefix) + len(job.prompt_ids), job.max_tokens)
        else:  # rag: retrieval happens in the worker, batched; here only what cannot fit at all is refused
            job.question = question
            self.too_long(engine.bare_rag_tokens(question), job.max_tokens)
        return job

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue the job; its events (start, deltas, done or error) arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev: dict) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        job.emit = emit
        try:
            self.scheduler.submit(job)
        except ShuttingDown:
            raise ApiError(503, "The server is shutting down.", type_="server_error", code="shutting_down")
        return events

    async def run(self, job: Job, body: RequestBody, kind: str) -> Response:
        """Queue the job and answer: a stream of events, or the whole completion once the job is done."""
        events = self.submit(job)
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
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                return StreamingResponse(stream_events(job, events, first, rid, created, kind, include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            text, end = await _collect(events)
            settled = True
            if end["type"] == "error":
                raise ApiError(end["status"], end["message"], type_="server_error", code=end.get("code"))
            return JSONResponse(final_response(rid, created, job, first, end, text, kind))
        finally:
            if not settled:
                job.cancelled = True  # the request was abandoned while waiting: free its row


def _question(served: Served, messages: list[dict] | None, prompt: str | None) -> str:
    """What a context or rag memory answers: the last user message, or the completion prompt."""
    if messages is not None:
        question = _last_user(messages)
        if not question.strip():
            raise ApiError(400, f"The '{served.memory}' memory answers the last user message; there is none.",
                           param="messages", code="invalid_value")
    else:
        question = prompt
    if not question.strip():
        raise ApiError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    return question


def _last_user(messages: list[dict]) -> str:
    """The last user message's text ("" when there is none)."""
    users = [text_of(m["content"]) for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


async def _collect(events: asyncio.Queue) -> tuple[str, dict]:
    """The whole answer's text and its last event (done, or an error midway)."""
    text = []
    while True:
        ev = await events.get()
        if ev["type"] == "delta":
            text.append(ev["text"])
        elif ev["type"] in ("done", "error"):
            return "".join(text), ev


# ------------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------------


def create_app(engine: Engine, scheduler: Scheduler, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_tokens_limit: int = MAX_TOKENS_LIMIT,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, reports_dir: Path | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s memories through ``scheduler`` (its shutdown drains the queue)."""
    api = Api(engine, scheduler, api_key=api_key, limits=Limits(max_body_bytes, max_tokens_limit, default_max_tokens),
              reports_dir=reports_dir or engine.ws.reports_dir)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has stopped accepting and waited for open requests; finish whatever is still queued.
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="engrain", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler = engine, scheduler
    add_error_handlers(app)
    add_openai_routes(app, api)
    add_playground_routes(app, api)
    return app


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, unknown routes and methods, and bodies FastAPI itself refused."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(400, "Invalid request.", code="invalid_request")


def add_openai_routes(app: FastAPI, api: Api) -> None:
    """``/v1/models`` and the two completion endpoints."""

    @app.get("/v1/models")
    async def list_models(request: Request):
        api.authorize(request)
        return {"object": "list", "data": [api.model_card(s) for s in api.engine.models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        api.authorize(request)
        return api.model_card(api.lookup(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        api.authorize(request)
        body = parse(ChatBody, await read_json(request, api.limits.max_body_bytes))
        served = api.lookup(body.model)
        job = api.make_job(served, sampling_options(body, api.limits), messages=chat_messages(body))
        return await api.run(job, body, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        api.authorize(request)
        body = parse(CompletionBody, await read_json(request, api.limits.max_body_bytes))
        served = api.lookup(body.model)
        job = api.make_job(served, sampling_options(body, api.limits), prompt=single_prompt(body))
        return await api.run(job, body, "text")


def add_playground_routes(app: FastAPI, api: Api) -> None:
    """Health, the playground page and what it shows: the models and the latest comparison report."""
    engine, scheduler = api.engine, api.scheduler

    @app.get("/health")
    async def health():
        import psutil

        return {"status": "draining" if scheduler.closing else "ok", "models": len(engine.served),
                "queue": scheduler.pending(), "auth": bool(api.api_key),
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                "weights_mb": round(engine.weight_bytes() / 2**20, 1), **scheduler.stats,
                "prompt_cache": scheduler.prompt_cache_stats(), "worker_seconds": scheduler.worker_seconds(),
                "prefill_tokens": dict(scheduler.prefilled)}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("engrain.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/engrain/info")
    async def info(request: Request):
        api.authorize(request)
        report = latest_report(api.reports_dir)
        return {"workspace": engine.prefix, "models": [api.model_card(s) for s in engine.models()],
                "skipped": engine.skipped,
                "report": {"name": report.parent.name, "url": "/reports/latest"} if report else None}

    @app.get("/reports/latest")
    async def report_latest(request: Request):
        api.authorize(request)
        report = latest_report(api.reports_dir)
        if report is None:
            raise ApiError(404, "There is no comparison report yet: run engrain compare.", code="not_found")
        return HTMLResponse(report.read_text(encoding="utf-8", errors="replace"))


def latest_report(reports_dir: Path) -> Path | None:
    """The newest ``<reports>/<name>/report.html``, found by listing the folder (no request reaches a path)."""
    if not reports_dir.is_dir():
        return None
    found = [d / "report.html" for d in reports_dir.iterdir() if d.is_dir() and (d / "report.html").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


# ------------------------------------------------------------------------------------------------------
# Running it
# ------------------------------------------------------------------------------------------------------


def build(ws_root: Path | str, model_spec: str | None = None, *, device: str | None = None, max_batch: int = 8,
          log=None, lora_adapters: bool = False, reuse_chunks: bool = False) -> tuple[Engine, Scheduler]:
    """Load the model and every memory of the workspace, and start the worker. LoRA memories are merged into
    their own copy of the weights unless ``lora_adapters`` (engine.py says what each costs)."""
    from ..models import load_for_workspace
    from ..workspace import Workspace

    ws = Workspace.at(ws_root)
    if not ws.root.is_dir():
        raise EngrainError(f"The workspace {ws.root} does not exist.",
                           hint="Create one first: engrain ingest DOCS_DIR -w WORKSPACE")

    def load() -> Engine:
        engine = Engine(ws, load_for_workspace(ws.root, model_spec, device), log=log, lora_adapters=lora_adapters)
        _warm_up(engine, log or (lambda msg: None))
        return engine

    engine = on_passing_thread(load, "engrain-serve-load")  # no OpenMP pool left on the main thread
    return engine, Scheduler(engine, max_batch=max_batch, reuse_chunks=reuse_chunks)


def _warm_up(engine: Engine, log) -> None:
    from ..models import compiled_decode

    started = time.perf_counter()
    if built := engine.prepare():
        log(f"engrain serve: built {', '.join(built)} in {time.perf_counter() - started:.1f} s")
    if not compiled_decode.wanted(engine.lm.model):
        return
    log("engrain serve: compiling the decode step (model.compile_decode); kernels are cached for the next start")
    started = time.perf_counter()
    warmed = engine.warm_up()
    log(f"engrain serve: decode step compiled for {', '.join(warmed) or 'nothing'} "
        f"in {time.perf_counter() - started:.0f} s")


def serve(ws_root: Path | str, model_spec: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 8, max_tokens_limit: int = MAX_TOKENS_LIMIT,
          log=print, lora_adapters: bool = False, reuse_chunks: bool = False) -> None:
    """Run the server until interrupted (SIGINT/SIGTERM: open requests and queued jobs are finished first)."""
    import uvicorn

    api_key = api_key or None
    check_bind(host, api_key)  # before loading anything: a refused start should be instant
    engine, scheduler = build(ws_root, model_spec, max_batch=max_batch, log=log, lora_adapters=lora_adapters,
                              reuse_chunks=reuse_chunks)
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
