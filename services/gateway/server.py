"""The gateway's HTTP surface: the FastAPI app, its routes, and error mapping (in one place).

    create_app(GatewayConfig) -> FastAPI
      startup   load the tokenizer, open one gRPC channel to the router, learn the served model;
                generations travel multiplexed over one GenerateMany call
                (services/common/multiplex.py)
      routes    /health, /metrics, /version, /tokenize, /detokenize (tokenize.py),
                /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings (embeddings.py),
                /v1/responses (responses_api/)
      auth      with API keys configured, /v1/*, /tokenize and /detokenize want one
                (ApiKeyMiddleware, auth.py)
      ids, CORS X-Request-Id taken or made and echoed (request_id.py); CORS with --allowed-origins
      telemetry one SERVER span per request (continuing `traceparent`), Prometheus metrics
      errors    OpenAIError, router gRPC status and validation errors -> OpenAI error bodies

A client that disconnects cancels its router calls: a watcher waits for `http.disconnect` while a
non-streaming request (or a stream's first chunk) is pending, and `_SSEResponse` keeps watching
during the stream. Beyond the HTTP request itself the gateway keeps only the responses /v1/responses
stores (bounded, in this replica's memory; responses_api/store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import anyio
import grpc
import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from services.common.auth import Secrets, dial
from services.common.metrics import serve_metrics
from services.common.multiplex import Multiplexer
from services.common.tracing import fastapi_options, outgoing_metadata, record_error, setup_tracing
from services.gateway.args import GatewayConfig
from services.gateway.auth import ApiKeyMiddleware
from services.gateway.embeddings import EmbeddingRequest, embed
from services.gateway.errors import to_openai_error, validation_error
from services.gateway.handler import Handler, RouterCalls, ServedModel
from services.gateway.limits import SizeLimits
from services.gateway.metrics import GatewayMetrics, TelemetryMiddleware, UsageStub
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
)
from services.gateway.request_id import HEADER as REQUEST_ID_HEADER
from services.gateway.request_id import RequestIdMiddleware, request_id_of
from services.gateway.responses import Job, Metadata
from services.gateway.responses_api import Responses, ResponsesRequest
from services.gateway.tokenize import detokenize, tokenize
from services.gateway.tokenizer import Tokenizer
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.version import tandem_version

logger = logging.getLogger("tandem.gateway")
T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),  # long token-id prompts
    ("grpc.max_receive_message_length", 64 << 20),
]
_CLIENT_CLOSED_REQUEST = 499  # nginx's convention; nobody reads it, the client is gone


def _error_response(exc: BaseException) -> JSONResponse:
    error = to_openai_error(exc)
    if error.status >= 500:  # a client's mistake (4xx) is not the request span's error
        record_error(trace.get_current_span(), exc, f"HTTP {error.status}: {error.message}")
    # Capacity and availability errors are temporary: say when to come back. Starlette's own
    # errors keep their headers (a 405's Allow).
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    if error.status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


class _Gateway:
    """What the app holds between requests: the router channel and the handler."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.channel: grpc.aio.Channel | None = None
        self.stub: router_pb2_grpc.RouterServiceStub | None = None
        self.multiplexed: Multiplexer | None = None
        self.handler: Handler | None = None
        self.responses: Responses | None = None

    async def start(self) -> None:
        config = self.config
        tokenizer = await asyncio.to_thread(Tokenizer, config.tokenizer)
        self.channel = dial(config.router, config.router_api_key, _CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        model = await self._resolve_model()
        if config.router_streams == "multiplexed":  # generations over one GenerateMany call
            self.multiplexed = Multiplexer(self.stub, router_pb2)
        # UsageStub: the router calls count their tokens for the request's span (when it records).
        router = cast(router_pb2_grpc.RouterServiceStub, self.multiplexed or self.stub)
        stub = cast(router_pb2_grpc.RouterServiceStub, UsageStub(router))
        self.handler = Handler(
            tokenizer,
            stub,
            model,
            config.request_timeout,
            tool_call_parser=config.tool_call_parser,
            reasoning_parser=config.reasoning_parser,
            limits=config.limits,
        )
        self.responses = Responses(self.handler, config.responses_store_size)
        logger.info(
            "serving model %r (context %s) via router %s", model.name, model.max_context_len, config.router
        )

    async def stop(self) -> None:
        if self.multiplexed is not None:
            self.multiplexed.close()
        if self.channel is not None:
            await self.channel.close()

    async def _resolve_model(self) -> ServedModel:
        config, stub = self.config, self.stub
        assert stub is not None
        if config.served_model_name is not None:
            # The name is known: the router only adds the context length, and may come up later.
            try:
                response = await stub.ListModels(
                    router_pb2.ListModelsRequest(), timeout=config.health_timeout
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning("router %s not answering yet (%s)", config.router, exc.code().name)
                return ServedModel(config.served_model_name, config.max_model_len)
            return self._served_model(response) or ServedModel(config.served_model_name, config.max_model_len)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.startup_timeout
        while True:
            remaining = deadline - loop.time()
            try:
                response = await stub.ListModels(
                    router_pb2.ListModelsRequest(), timeout=max(remaining, 0.1), wait_for_ready=True
                )
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(
                    f"router {config.router} did not answer ListModels: {exc.details()}"
                ) from exc
            model = self._served_model(response)
            if model is not None:
                return model
            if loop.time() >= deadline:  # a router without workers lists no model yet
                raise RuntimeError(f"router {config.router} lists no model; pass --served-model-name")
            await asyncio.sleep(min(0.5, max(remaining, 0)))

    def _served_model(self, response: router_pb2.ListModelsResponse) -> ServedModel | None:
        name = self.config.served_model_name
        models = list(response.models)
        if not models:
            return None
        found = next((m for m in models if m.id == name), models[0])
        context = self.config.max_model_len or found.max_context_len or None
        return ServedModel(name or found.id, context, found.created or int(time.time()))

    async def probe(self) -> router_pb2.ListModelsResponse:
        """Ask the router for its models (the health check), learning the context length if unknown."""
        assert self.stub is not None and self.handler is not None
        response = await self.stub.ListModels(
            router_pb2.ListModelsRequest(), timeout=self.config.health_timeout
        )
        if self.handler.model.max_context_len is None:
            learned = self._served_model(response)
            if learned is not None and learned.max_context_len is not None:
                self.handler.model = ServedModel(
                    self.handler.model.name, learned.max_context_len, learned.created
                )
        return response


class _SSEResponse(StreamingResponse):
    """A stream that always watches for the client leaving and then runs `on_close`.

    Starlette only watches `receive` for servers below ASGI spec 2.4; relying on a failing `send`
    instead would leave a stalled generation running until its next token.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self._on_close()


# Compact UTF-8 JSON, the values json.dumps(..., ensure_ascii=False, separators=(",", ":")) writes
# (a float may be spelled otherwise, 1e-05 as 0.00001; a non-finite one is null), in a tenth of the
# time: 0.34 against 3.7 us a completion chunk, and every streamed token is one.
_encode_json = msgspec.json.Encoder().encode


def _sse(data: Any) -> bytes:
    return b"data: " + _encode_json(data) + b"\n\n"


async def _sse_events(first: dict[str, Any], chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        yield _sse(first)
        async for chunk in chunks:
            yield _sse(chunk)
    except (OpenAIError, grpc.aio.AioRpcError) as exc:
        # Headers are out: the error travels as an event, as OpenAI's streams do.
        error = to_openai_error(exc)
        record_error(trace.get_current_span(), exc, f"in the stream: {error.message}")
        yield _sse(error.body())
    yield b"data: [DONE]\n\n"


async def _typed_sse_events(
    first: dict[str, Any], events: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[bytes]:
    """The Responses API's stream: each event named by its type (`event:` line), no `[DONE]`;
    `Responses.stream` ends it with its own failure event."""
    yield b"event: " + first["type"].encode() + b"\n" + _sse(first)
    async for event in events:
        yield b"event: " + event["type"].encode() + b"\n" + _sse(event)


class _ClientGone(Exception):
    pass


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its router calls) if the client disconnects first."""

    async def disconnected() -> None:
        # The body was read already, so the next message is the disconnect (event-driven, no polling).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let its cleanup (cancelling router calls) run first
    raise _ClientGone


async def _answer(request: Request, calls: RouterCalls, body: Awaitable[dict[str, Any]]) -> Response:
    """A whole JSON body, its router calls cancelled when the client leaves first."""
    try:
        return JSONResponse(await _until_disconnect(request, body))
    except _ClientGone:
        return Response(status_code=_CLIENT_CLOSED_REQUEST)
    finally:
        calls.cancel_all()


async def _answer_stream(
    request: Request,
    calls: RouterCalls,
    chunks: AsyncGenerator[dict[str, Any], None],
    render: Callable[[dict[str, Any], AsyncIterator[dict[str, Any]]], AsyncIterator[bytes]],
) -> Response:
    """An SSE stream of `chunks` (`render` writes the events), once the first chunk is there."""
    try:
        # Wait for the first chunk before the 200 goes out, so early router errors keep their status.
        first = await _until_disconnect(request, anext(chunks))
    except BaseException as exc:
        calls.cancel_all()
        await chunks.aclose()
        if isinstance(exc, _ClientGone):
            return Response(status_code=_CLIENT_CLOSED_REQUEST)
        raise
    return _SSEResponse(render(first, chunks), on_close=calls.cancel_all)


async def _generate(request: Request, job: Job, handler: Handler, stream: bool) -> Response:
    calls = RouterCalls()
    if not stream:
        return await _answer(request, calls, handler.complete(job, calls))
    return await _answer_stream(request, calls, handler.stream(job, calls), _sse_events)


def _router_metadata(request: Request) -> Metadata:
    """What the router calls carry: the request span's trace context and the request id."""
    request_id = request_id_of(request.scope)
    own = ((REQUEST_ID_HEADER.decode(), request_id),) if request_id else ()
    return (*(outgoing_metadata() or ()), *own)


def _note_job(job: Job, stream: bool) -> None:
    """What the request span says about the job (TelemetryMiddleware adds HTTP and tokens)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "gen_ai.request.model": job.model,
                "tandem.request_id": job.id,
                "tandem.n": job.n,
                "tandem.stream": stream,
                "tandem.prompts": len(job.requests),
            }
        )


def stop_starting(app: FastAPI) -> None:
    """End the app's start-up if it still waits (for the tokenizer or the router, which may take
    `--startup-timeout`: minutes under `tandem up`): uvicorn acts on SIGTERM or Ctrl-C only once
    started. Safe from a signal handler."""
    starting: asyncio.Future[None] | None = getattr(app.state, "starting", None)
    if starting is not None and not starting.done():
        starting.get_loop().call_soon_threadsafe(starting.cancel)


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app; startup (tokenizer, router channel, served model) runs in its lifespan."""
    gateway = _Gateway(config)
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracing = setup_tracing("tandem-gateway")
        starting = asyncio.ensure_future(gateway.start())
        app.state.starting = starting  # for `stop_starting`
        stop_metrics: Callable[[], None] | None = None
        try:
            await starting
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if not starting.cancelled() or (this is not None and this.cancelling()):
                raise
            # uvicorn stops at once after the lifespan's start, without serving a request.
            logger.info("stopped during start-up")
        else:
            # Once started: a launcher waiting for this port knows the process serves.
            metrics_url, stop_metrics = serve_metrics(metrics.registry, config.host, config.metrics_port)
            if metrics_url:
                print(f"tandem gateway metrics on {metrics_url}", flush=True)
        try:
            yield
        finally:
            if stop_metrics is not None:
                stop_metrics()
            await gateway.stop()
            tracing.shutdown()

    app = FastAPI(title="Tandem gateway", lifespan=lifespan, **fastapi_options())
    app.state.gateway = gateway
    # Inside the telemetry: a 401, 408, 413 or 431 is counted and traced like any other answer;
    # the key is checked (headers only) before the size limits read the body.
    app.add_middleware(SizeLimits, limits=config.limits)
    if config.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=Secrets(config.api_keys))
    if config.allowed_origins:
        # Outside the key check: a browser's preflight carries no key, and a 401 must be readable.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-Id", "Retry-After"],
        )
    app.add_middleware(TelemetryMiddleware, metrics=metrics)  # the request span, HTTP metrics
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries the id

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc.errors()))

    for exc_type in (OpenAIError, grpc.aio.AioRpcError, HTTPException):

        @app.exception_handler(exc_type)
        async def on_error(request: Request, exc: Exception) -> JSONResponse:
            return _error_response(exc)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette raises an unexpected exception again after this answer, and uvicorn then
        # closes the connection: say so, or a client would send its next request on it and get
        # "server disconnected" for a request that was fine.
        response = _error_response(exc)
        response.headers["Connection"] = "close"
        return response

    def handler() -> Handler:
        assert gateway.handler is not None, "requests arrive only after startup"
        return gateway.handler

    def responses() -> Responses:
        assert gateway.responses is not None, "requests arrive only after startup"
        return gateway.responses

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": tandem_version()}

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await gateway.probe()
        except grpc.aio.AioRpcError as exc:
            body = {"status": "unavailable", "router": config.router, "detail": exc.details()}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    def model_card() -> dict[str, Any]:
        model = handler().model
        card = {"id": model.name, "object": "model", "created": model.created, "owned_by": "tandem"}
        return {**card, "max_model_len": model.max_context_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        handler().check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        return await tokenize(handler(), body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, Any]:
        return await detokenize(handler(), body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        request_id = request_id_of(request.scope)
        job = await handler().prepare_completion(body, _router_metadata(request), request_id)
        _note_job(job, bool(body.stream))
        return await _generate(request, job, handler(), bool(body.stream))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        request_id = request_id_of(request.scope)
        job = await handler().prepare_chat(body, _router_metadata(request), request_id)
        _note_job(job, bool(body.stream))
        return await _generate(request, job, handler(), bool(body.stream))

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        run = await responses().prepare(body, _router_metadata(request), request_id_of(request.scope))
        _note_job(run.job, bool(body.stream))
        calls = RouterCalls()
        if not body.stream:
            return await _answer(request, calls, responses().complete(run, calls))
        return await _answer_stream(request, calls, responses().stream(run, calls), _typed_sse_events)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> dict[str, Any]:
        return responses().retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        return responses().delete(response_id)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
        work = embed(handler(), body, _router_metadata(request))
        try:
            return JSONResponse(await _until_disconnect(request, work))
        except _ClientGone:
            return Response(status_code=_CLIENT_CLOSED_REQUEST)

    return app
