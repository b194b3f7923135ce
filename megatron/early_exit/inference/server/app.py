"""The FastAPI application: Megatron's PUT /api, OpenAI's completions and chat, health and metrics.

Handlers validate (schemas.py), build a job (requests.py), hand it to the scheduler's worker
thread and wait on an asyncio queue that the worker fills through `loop.call_soon_threadsafe`.
While waiting they watch the connection: a client that goes away cancels its job, which frees
its batch slots at the scheduler's next iteration. Every error is JSON naming the field;
unexpected exceptions are logged and answered with a JSON 500, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megatron.early_exit import __version__
from megatron.early_exit.inference.server import responses as fmt
from megatron.early_exit.inference.server.errors import ApiError, from_validation
from megatron.early_exit.inference.server.metrics import Metrics
from megatron.early_exit.inference.server.playground import add_playground
from megatron.early_exit.inference.server.requests import Context, chat_job, completion_job, megatron_job
from megatron.early_exit.inference.server.scheduler import BaseScheduler, Event, Job, QueueFull
from megatron.early_exit.inference.server.schemas import ChatRequest, CompletionRequest, MegatronRequest

log = logging.getLogger(__name__)

MEGATRON_PATH = "/api"
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers probe it)
POLL_S = 0.2  # how often a waiting handler checks whether its client is still there


class _Gate:
    """Pure ASGI middleware (it does not buffer streams): API key check and per-status request counts."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
                err = ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", "api_key",
                               "authentication_error")  # fmt: skip
                await error_response(path, err)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(path, status[0])

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())


@dataclass
class _Run:
    """One request's job as the scheduler sees it: split into parts of at most --max-batch-size
    sequences (queued together), whose events arrive on one asyncio queue."""

    job: Job
    parts: list[Job]
    events: asyncio.Queue
    left: int = 0  # parts not finished yet


class _Server:
    """Glue between HTTP handlers and the scheduler thread."""

    def __init__(self, scheduler: BaseScheduler, ctx: Context, max_body: int) -> None:
        self.scheduler, self.ctx, self.max_body = scheduler, ctx, max_body
        # One thread: tokenizers need not be thread-safe (a Rust `tokenizers` object must not be
        # used from two threads at once while it pads or truncates; SentencePiece makes no promise).
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ee-request")

    async def prepare(self, request: Request, model: type[BaseModel], make: Callable):
        """(body, job): read a bounded body, then validate and tokenize it on a worker thread, so
        that a long prompt never holds the event loop (health checks and streams keep going)."""
        raw = await _read_body(request, self.max_body)

        def build():
            body = _parse(raw, model)
            return body, make(body)

        return await asyncio.get_running_loop().run_in_executor(self.builder, build)

    def submit(self, job: Job) -> _Run:
        """Queue the job's parts; their events arrive, numbered as the job's, on `_Run.events`."""
        run = _Run(job, _split(job, self.scheduler.max_batch_size), asyncio.Queue())
        loop, offset = asyncio.get_running_loop(), 0
        for part in run.parts:
            part.sink = _sink(loop, run.events, offset)
            offset += len(part.prompts)
        run.left = len(run.parts)
        try:
            self.scheduler.submit(*run.parts)
        except QueueFull as e:
            raise ApiError(503, str(e), None, "server_overloaded") from None
        except ValueError as e:
            raise ApiError(400, str(e), "prompts") from None
        return run

    def cancel(self, run: _Run) -> None:
        for part in run.parts:
            self.scheduler.cancel(part)  # no-op once done; frees the slots of an abandoned job

    async def next_event(self, request: Request, run: _Run) -> Event | None:
        """The job's next event ("done" once every part is); None when the client has gone away
        (the job is then cancelled)."""
        while True:
            try:
                ev = await asyncio.wait_for(run.events.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel(run)
                    return None
                continue
            if ev.kind == "error":
                e = ev.error
                if isinstance(e, ValueError):
                    raise ApiError(400, str(e), None)
                raise ApiError(500, f"decoding failed: {e}", None, "server_error")
            if ev.kind == "done":
                run.left -= 1
                if run.left:
                    continue
                _gather(run.job, run.parts)
            return ev

    async def wait(self, request: Request, job: Job) -> bool:
        """Run a job to the end; False when the client went away first."""
        run = self.submit(job)
        try:
            while True:
                ev = await self.next_event(request, run)
                if ev is None:
                    return False
                if ev.kind == "done":
                    return True
        finally:
            self.cancel(run)

    def stream(self, request: Request, job: Job, chunks: Callable[[Event], list[dict]], first: list[dict]):
        """A server-sent-events response: `data: {chunk}` lines, ending with `data: [DONE]`."""
        run = self.submit(job)  # before the response starts, so that 503/400 are real statuses

        async def body() -> AsyncIterator[str]:
            try:
                for chunk in first:
                    yield _sse(chunk)
                while True:
                    try:
                        ev = await self.next_event(request, run)
                    except ApiError as e:
                        yield _sse(e.body())
                        break
                    if ev is None:
                        return
                    for chunk in chunks(ev):
                        yield _sse(chunk)
                    if ev.kind == "done":
                        break
                yield "data: [DONE]\n\n"
            finally:
                self.cancel(run)  # the generator is closed when the client disconnects

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _split(job: Job, size: int) -> list[Job]:
    """The job itself, or parts of `size` sequences; a seeded job's part k samples with seed + k."""
    if len(job.prompts) <= size:
        return [job]
    parts = []
    for k, start in enumerate(range(0, len(job.prompts), size)):
        s = job.settings if job.settings.seed is None else replace(job.settings, seed=job.settings.seed + k)
        part = Job(job.prompts[start : start + size], s, job.policy, score_prompt=job.score_prompt,
                   top_logprobs=job.top_logprobs, stream=job.stream, logit_bias=job.logit_bias)  # fmt: skip
        part.counts_as_request = start + size >= len(job.prompts)
        parts.append(part)
    return parts


def _gather(job: Job, parts: list[Job]) -> None:
    """The parts' results, in order, as the whole job's."""
    if parts == [job]:
        return
    for name in ("results", "prompt_logprobs", "prompt_top", "prompt_exit_layers", "token_top", "counts"):
        setattr(job, name, [x for part in parts for x in getattr(part, name)])
    job.started = min(p.started for p in parts)
    job.finished = max(p.finished for p in parts)


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, offset: int) -> Callable[[Event], None]:
    """Thread-safe delivery of a part's events, its sequence numbers shifted to the job's."""

    def put(ev: Event) -> None:
        if offset:
            ev = replace(ev, index=ev.index + offset)
        loop.call_soon_threadsafe(events.put_nowait, ev)

    return put


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"body: {size} bytes exceed the server's --max-body-bytes {limit}", "body")


def _parse(raw: bytes, model: type[BaseModel]):
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise from_validation(e) from None


def create_app(
    scheduler: BaseScheduler, ctx: Context, metrics: Metrics, api_key: str | None = None, max_body: int = 16 << 20
) -> FastAPI:
    """The application; `scheduler` must be started (and is stopped by the caller)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key: empty; give a key, or None for no authentication")
    app = FastAPI(title="megatron-early-exit text generation", version=__version__)
    server = _Server(scheduler, ctx, max_body)
    metrics.load = scheduler.load
    _add_error_handlers(app)
    _add_megatron_route(app, server)
    _add_openai_routes(app, server)
    _add_service_routes(app, server, metrics)
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    add_playground(app)  # GET /: the page; after the gate, so that ?api_key= reaches it as a header
    return app


def error_response(path: str, err: ApiError) -> JSONResponse:
    """OpenAI's {"error": {...}}; on Megatron's PUT /api also its top-level "message", which
    Megatron's and EE-LLM's clients print."""
    body = err.body()
    if path == MEGATRON_PATH:
        body = {"message": err.message, **body}
    return JSONResponse(body, status_code=err.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(request.url.path, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = ApiError(422, str(e.errors()[0].get("msg", "invalid request")), "body")
        return error_response(request.url.path, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(request.url.path, ApiError(e.status_code, str(e.detail), None, kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        err = ApiError(500, f"internal error: {type(e).__name__}; see the server log", None, "server_error")
        return error_response(request.url.path, err)


def _add_megatron_route(app: FastAPI, server: _Server) -> None:
    @app.put(MEGATRON_PATH)
    async def megatron_api(request: Request) -> Response:
        """Megatron-LM / EE-LLM text generation (see schemas.MegatronRequest)."""
        start = time.perf_counter()
        body, job = await server.prepare(request, MegatronRequest, lambda b: megatron_job(b, server.ctx))
        if not await server.wait(request, job):
            return Response(status_code=499)
        out = fmt.megatron_response(job, body, server.ctx.tokenizer, time.perf_counter() - start)
        return JSONResponse(out)


def _add_openai_routes(app: FastAPI, server: _Server) -> None:
    ctx = server.ctx

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, job = await server.prepare(request, CompletionRequest, lambda b: completion_job(b, ctx))
        echo = _echo_texts(body, ctx.tokenizer, job) if body.echo else []
        include = bool(body.stream_options and body.stream_options.include_usage)
        meta = fmt.Meta(ctx.model_name, "cmpl", echo, body.logprobs, include)
        if body.stream:
            first = [fmt._completion_chunk(meta, i, t, None, None) for i, t in enumerate(echo) if t]
            starts = [len(t) for t in echo] or [len(ctx.tokenizer.detokenize(p)) for p in job.prompts]
            state = fmt.StreamState(ctx.tokenizer, job.prompts, starts)
            return server.stream(request, job, lambda ev: fmt.completion_chunks(ev, job, meta, body.n, state), first)
        if not await server.wait(request, job):
            return Response(status_code=499)
        return JSONResponse(fmt.completion_response(job, meta, ctx.tokenizer, body.n))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, (job, _) = await server.prepare(request, ChatRequest, lambda b: chat_job(b, ctx))
        include = bool(body.stream_options and body.stream_options.include_usage)
        top = (body.top_logprobs or 0) if body.logprobs else None
        meta = fmt.Meta(ctx.model_name, "chatcmpl", [], top, include)
        if body.stream:
            state = fmt.StreamState(ctx.tokenizer, job.prompts, [0] * len(job.prompts))
            return server.stream(request, job, lambda ev: fmt.chat_chunks(ev, job, meta, body.n, state), [])
        if not await server.wait(request, job):
            return Response(status_code=499)
        return JSONResponse(fmt.chat_response(job, meta, ctx.tokenizer, body.n))

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "megatron-early-exit"}
        card["early_exit"] = {"exit_layers": list(ctx.engine.exits), "num_layers": ctx.engine.num_layers}
        return {"object": "list", "data": [card]}


def _echo_texts(body: CompletionRequest, tokenizer, job: Job) -> list[str]:
    """The prompt as the client wrote it (strings), or decoded (token ids); one per sequence."""
    p = body.prompt
    if isinstance(p, str):
        texts = [p]
    elif isinstance(p[0], str):
        texts = list(p)
    else:
        texts = [tokenizer.detokenize(ids) for ids in job.prompts[:: body.n]]
    return [t for t in texts for _ in range(body.n)]


def _add_service_routes(app: FastAPI, server: _Server, metrics: Metrics) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict:
        queued, running = server.scheduler.load()
        return {"status": "ok", "model": server.ctx.model_name, "queued": queued, "running": running}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")
