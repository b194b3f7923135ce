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
                await JSONResponse(err.body(), status_code=401)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.request(path, status[0])

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode(), self.api_key.encode())


class _Server:
    """Glue between HTTP handlers and the scheduler thread."""

    def __init__(self, scheduler: BaseScheduler, ctx: Context) -> None:
        self.scheduler, self.ctx = scheduler, ctx

    def submit(self, job: Job) -> asyncio.Queue:
        """Queue the job; its events arrive on the returned asyncio queue."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job.sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(503, str(e), None, "server_overloaded") from None
        except ValueError as e:
            raise ApiError(400, str(e), "prompts") from None
        return events

    async def next_event(self, request: Request, job: Job, events: asyncio.Queue) -> Event | None:
        """The job's next event; None when the client has gone away (the job is then cancelled)."""
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    return None
                continue
            if ev.kind == "error":
                e = ev.error
                if isinstance(e, ValueError):
                    raise ApiError(400, str(e), None)
                raise ApiError(500, f"decoding failed: {e}", None, "server_error")
            return ev

    async def wait(self, request: Request, job: Job) -> bool:
        """Run a job to the end; False when the client went away first."""
        events = self.submit(job)
        try:
            while True:
                ev = await self.next_event(request, job, events)
                if ev is None:
                    return False
                if ev.kind == "done":
                    return True
        finally:
            self.scheduler.cancel(job)  # no-op once done; frees the slots of an abandoned job

    def stream(self, request: Request, job: Job, chunks: Callable[[Event], list[dict]], first: list[dict]):
        """A server-sent-events response: `data: {chunk}` lines, ending with `data: [DONE]`."""
        events = self.submit(job)  # before the response starts, so that 503/400 are real statuses

        async def body() -> AsyncIterator[str]:
            try:
                for chunk in first:
                    yield _sse(chunk)
                while True:
                    try:
                        ev = await self.next_event(request, job, events)
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
                self.scheduler.cancel(job)  # the generator is closed when the client disconnects

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _parse(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise from_validation(e) from None


def create_app(scheduler: BaseScheduler, ctx: Context, metrics: Metrics, api_key: str | None = None) -> FastAPI:
    """The application; `scheduler` must be started (and is stopped by the caller)."""
    app = FastAPI(title="megatron-early-exit text generation", version=__version__)
    server = _Server(scheduler, ctx)
    metrics.load = scheduler.load
    _add_error_handlers(app)
    _add_megatron_route(app, server)
    _add_openai_routes(app, server)
    _add_service_routes(app, server, metrics)
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    add_playground(app)  # GET /: the page; after the gate, so that ?api_key= reaches it as a header
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        err = ApiError(422, str(e.errors()[0].get("msg", "invalid request")), "body")
        return JSONResponse(err.body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), None, kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        err = ApiError(500, f"internal error: {type(e).__name__}; see the server log", None, "server_error")
        return JSONResponse(err.body(), status_code=500)


def _add_megatron_route(app: FastAPI, server: _Server) -> None:
    @app.put("/api")
    async def megatron_api(request: Request) -> Response:
        """Megatron-LM / EE-LLM text generation (see schemas.MegatronRequest)."""
        start = time.perf_counter()
        body = await _parse(request, MegatronRequest)
        job = megatron_job(body, server.ctx)
        if not await server.wait(request, job):
            return Response(status_code=499)
        out = fmt.megatron_response(job, body, server.ctx.tokenizer, time.perf_counter() - start)
        return JSONResponse(out)


def _add_openai_routes(app: FastAPI, server: _Server) -> None:
    ctx = server.ctx

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        job = completion_job(body, ctx)
        echo = _echo_texts(body, ctx.tokenizer, job) if body.echo else []
        include = bool(body.stream_options and body.stream_options.include_usage)
        meta = fmt.Meta(ctx.model_name, "cmpl", echo, body.logprobs, include)
        if body.stream:
            first = [fmt._completion_chunk(meta, i, t, None, None) for i, t in enumerate(echo) if t]
            return server.stream(request, job, lambda ev: fmt.completion_chunks(ev, job, meta, body.n), first)
        if not await server.wait(request, job):
            return Response(status_code=499)
        return JSONResponse(fmt.completion_response(job, meta, ctx.tokenizer, body.n))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatRequest)
        job, _ = chat_job(body, ctx)
        include = bool(body.stream_options and body.stream_options.include_usage)
        top = (body.top_logprobs or 0) if body.logprobs else None
        meta = fmt.Meta(ctx.model_name, "chatcmpl", [], top, include)
        if body.stream:
            started: set[int] = set()
            return server.stream(request, job, lambda ev: fmt.chat_chunks(ev, job, meta, body.n, started), [])
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
    @app.get("/health")
    async def health() -> dict:
        queued, running = server.scheduler.load()
        return {"status": "ok", "model": server.ctx.model_name, "queued": queued, "running": running}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")
