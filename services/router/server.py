"""The router's gRPC services: RouterService (public: Generate, GenerateMany, Embed, ListModels,
Tokenize) and RouterAdminService (workers register, heartbeat, drain, leave). Thin: validation,
tokenizing text-only requests, and wire <-> domain; routing is the orchestrator's. Each
generation (a Generate call, or a stream of a GenerateMany call: services/common/multiplex.py) is one
`router.generate` SERVER span continuing the caller's trace, and one count in the metrics."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.convert import MAX_N, MAX_TOP_LOGPROBS
from services.common.errors import grpc_errors
from services.common.metrics import status_name
from services.common.multiplex import GenerateServicer, Metadata
from services.common.tracing import server_span
from services.protos.tandem.common.v1 import common_pb2
from services.protos.tandem.router.v1 import router_pb2, router_pb2_grpc
from services.router.limits import PromptLimits, check_prompt, check_sampling, check_text
from services.router.metrics import RequestRecord
from services.router.orchestrator import Orchestrator, Sample
from services.router.registry import Registry
from shared.errors import InvalidRequest, NotFound

MAX_EMBED_INPUTS = 2048  # OpenAI's bound on one embeddings request


class RouterServicer(GenerateServicer, router_pb2_grpc.RouterServiceServicer):
    batch_type = router_pb2.GenerateManyResponse

    def __init__(
        self,
        orchestrator: Orchestrator,
        registry: Registry,
        tokenizer: Any,
        limits: PromptLimits | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.registry = registry
        self.tokenizer = tokenizer
        self.limits = limits or PromptLimits()
        self.created = int(time.time())

    async def _serve(
        self, request: router_pb2.GenerateRequest, metadata: Metadata
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """One generation, a Generate call's or a GenerateMany stream's: its span (continuing the
        trace in `metadata`) and metrics around the checks and the orchestration."""
        metrics = self.orchestrator.metrics
        record = RequestRecord()
        error: BaseException | None = None
        metrics.running.inc()
        with server_span("router.generate", metadata) as span:
            try:
                async for resp in self._generate(request, record):
                    yield resp
            except BaseException as e:
                error = e
                raise
            finally:
                metrics.running.dec()
                status = status_name(error)
                metrics.requests.labels(record.mode, status).inc()
                if span.is_recording():
                    record.annotate(span, status)

    async def _generate(
        self, request: router_pb2.GenerateRequest, record: RequestRecord
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        if request.model and request.model != self.registry.model:
            raise NotFound(
                f"model {request.model!r} is not served here; this router serves {self.registry.model!r}"
            )
        n = request.n or 1
        if not 1 <= n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {n}", param="n")
        if request.top_logprobs_num > MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs_num}",
                param="top_logprobs_num",
            )
        # Sizes first: tokenizing and the radix tree grow with the prompt and cannot be interrupted.
        check_prompt(len(request.token_ids), request.text, self.limits, self.registry.max_context_len())
        check_sampling(request.sampling_params)
        token_ids = list(request.token_ids)
        if not token_ids:
            if not request.text:
                raise InvalidRequest("the prompt is empty: send text or token_ids", param="text")
            token_ids = await asyncio.to_thread(self.tokenizer.encode, request.text)
        request_id = request.request_id or random.getrandbits(63) or 1
        record.request_id, record.n = request_id, n
        samples = []
        for i in range(n):
            params = common_pb2.SamplingParams()
            params.CopyFrom(request.sampling_params)
            if i and params.HasField("seed"):
                params.seed = (params.seed + i) % 2**63  # sample i of a seeded request: seed + i
            samples.append(
                Sample(
                    request_id,
                    i,
                    token_ids,
                    request.text,
                    params,
                    request.return_logprob,
                    request.top_logprobs_num,
                )
            )
        async for resp in self.orchestrator.generate(samples, record):
            yield resp

    @grpc_errors
    async def Embed(
        self, request: router_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.EmbedResponse:
        if request.model and request.model != self.registry.model:
            raise NotFound(
                f"model {request.model!r} is not served here; this router serves {self.registry.model!r}"
            )
        if not 1 <= len(request.inputs) <= MAX_EMBED_INPUTS:
            raise InvalidRequest(
                f"inputs must hold 1 to {MAX_EMBED_INPUTS} inputs, got {len(request.inputs)}", param="inputs"
            )
        context_len = self.registry.max_context_len()
        for inp in request.inputs:  # sizes first, before any tokenizing
            check_prompt(len(inp.token_ids), inp.text, self.limits, context_len)
            if not inp.token_ids and not inp.text:
                raise InvalidRequest("an input is empty: send text or token_ids", param="inputs")
        inputs = [
            list(inp.token_ids) or await asyncio.to_thread(self.tokenizer.encode, inp.text)
            for inp in request.inputs
        ]
        request_id = request.request_id or random.getrandbits(63) or 1
        with server_span("router.embed", context.invocation_metadata()) as span:
            span.set_attribute("tandem.request_id", str(request_id))
            answer, worker = await self.orchestrator.embed(request_id, inputs, request.options)
            span.set_attribute("tandem.worker", worker)
        usage = common_pb2.Usage(
            prompt_tokens=sum(e.prompt_tokens for e in answer.embeddings),
            cached_tokens=sum(e.cached_tokens for e in answer.embeddings),
        )
        return router_pb2.EmbedResponse(
            request_id=request_id, embeddings=answer.embeddings, usage=usage, worker=worker
        )

    @grpc_errors
    async def ListModels(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        model = router_pb2.Model(
            id=self.registry.model, max_context_len=self.registry.max_context_len(), created=self.created
        )
        return router_pb2.ListModelsResponse(models=[model])

    @grpc_errors
    async def Tokenize(
        self, request: router_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.TokenizeResponse:
        check_text(request.text, self.limits, self.registry.max_context_len())
        ids = await asyncio.to_thread(
            self.tokenizer.encode, request.text, add_special_tokens=request.add_special_tokens
        )
        return router_pb2.TokenizeResponse(token_ids=ids)


class RouterAdminServicer(router_pb2_grpc.RouterAdminServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    @grpc_errors
    async def RegisterWorker(
        self, request: router_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RegisterWorkerResponse:
        worker = await self.registry.register(request.address)
        return router_pb2.RegisterWorkerResponse(
            worker=worker.to_proto(), heartbeat_interval_ms=int(self.registry.heartbeat_interval_s * 1000)
        )

    @grpc_errors
    async def Heartbeat(
        self, request: router_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.HeartbeatResponse:
        return router_pb2.HeartbeatResponse(known=self.registry.heartbeat(request.address))

    @grpc_errors
    async def DrainWorker(
        self, request: router_pb2.DrainWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.DrainWorkerResponse:
        self.registry.drain(request.address)
        return router_pb2.DrainWorkerResponse()

    @grpc_errors
    async def RemoveWorker(
        self, request: router_pb2.RemoveWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RemoveWorkerResponse:
        await self.registry.remove(request.address)
        return router_pb2.RemoveWorkerResponse()

    @grpc_errors
    async def ListWorkers(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(workers=[w.to_proto() for w in self.registry.workers.values()])
