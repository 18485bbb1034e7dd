"""gRPC transport: proto <-> domain, and the one mapping of errors to status codes.

Nothing here decides anything about email; it converts messages, maps exceptions
(`status_of`), counts calls, and checks bearer tokens.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from phishgate.classifier.batcher import DeadlineExceeded
from phishgate.classifier.domain import AdapterView, ClassifierService, Verdict
from phishgate.classifier.logs import request_id_var
from phishgate.classifier.metrics import ClassifierMetrics
from phishgate.core.errors import (
    AdapterNotFound,
    EngineOverloaded,
    EngineUnavailable,
    InvalidMessage,
)
from phishgate.core.registry import AdapterRef
from phishgate.v1 import classifier_pb2 as pb
from phishgate.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidMessage, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineOverloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def status_of(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-safe message for an exception raised while serving.

    Domain errors carry messages written for callers; anything else is logged with its
    traceback here and reaches the caller only as INTERNAL with the request id.
    """
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc)
    log.error("unexpected error", exc_info=exc, extra={"request_id": request_id})
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """phishgate.v1.Classifier over a ClassifierService."""

    def __init__(
        self,
        service: ClassifierService,
        metrics: ClassifierMetrics,
        *,
        stream_concurrency: int,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.stream_concurrency = stream_concurrency

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        request_id = request.request_id or uuid.uuid4().hex[:16]
        request_id_var.set(request_id)
        outcome = await self._classify(request, request_id, context.time_remaining())
        if isinstance(outcome, pb.ClassifyError):
            await context.abort(grpc.StatusCode[outcome.code], outcome.message)
        assert isinstance(outcome, pb.ClassifyResponse)
        return outcome

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[pb.ClassifyRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        results: asyncio.Queue[pb.ClassifyStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ClassifyRequest, request_id: str) -> None:
            try:
                request_id_var.set(request_id)
                outcome = await self._classify(request, request_id, context.time_remaining())
                if isinstance(outcome, pb.ClassifyError):
                    item = pb.ClassifyStreamResponse(request_id=request_id, error=outcome)
                else:
                    item = pb.ClassifyStreamResponse(request_id=request_id, result=outcome)
                await results.put(item)
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    request_id = request.request_id or uuid.uuid4().hex[:16]
                    task = asyncio.create_task(one(request, request_id))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await results.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not None:
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        try:
            views = self.service.list_adapters()
        except Exception as exc:
            await context.abort(*status_of(exc, ""))
        return pb.ListAdaptersResponse(adapters=[_adapter_info(view) for view in views])

    async def _classify(
        self, request: pb.ClassifyRequest, request_id: str, time_remaining: float | None
    ) -> pb.ClassifyResponse | pb.ClassifyError:
        """The response, or the error the caller gets; counts and times the call."""
        started = time.perf_counter()
        name = request.adapter or "default"
        try:
            name = self.service.adapter_name(request.adapter)
            verdict = await self.service.classify(
                request.raw_message, request.adapter, request_id, timeout=time_remaining
            )
        except Exception as exc:
            code, message = status_of(exc, request_id)
            known = code != grpc.StatusCode.NOT_FOUND
            self.metrics.requests.labels(name if known else "unknown", code.name).inc()
            log.info("classify failed: %s %s", code.name, message, extra={"adapter": name})
            return pb.ClassifyError(code=code.name, message=message)
        metrics = self.metrics
        metrics.requests.labels(name, "OK").inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)
        metrics.labels.labels(name, verdict.score.label).inc()
        log.info(
            "classified %s %.4f with %s version %s",
            verdict.score.label,
            verdict.score.score,
            name,
            verdict.adapter.version,
            extra={"latency_ms": round(verdict.latency_ms, 2)},
        )
        return _response(verdict)


def _ref(ref: AdapterRef) -> pb.AdapterRef:
    return pb.AdapterRef(name=ref.name, version=ref.version, source=ref.source)


def _response(verdict: Verdict) -> pb.ClassifyResponse:
    score = verdict.score
    return pb.ClassifyResponse(
        request_id=verdict.request_id,
        label=score.label,
        score=score.score,
        scores=[pb.LabelScore(label=label, score=p) for label, p in score.scores.items()],
        threshold=score.threshold,
        adapter=_ref(verdict.adapter),
        model_id=verdict.model_id,
        prompt_version=verdict.prompt_version,
        latency_ms=verdict.latency_ms,
        input_tokens=score.n_tokens,
        truncated=score.truncated,
    )


def _adapter_info(view: AdapterView) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        ref=_ref(view.ref),
        labels=list(view.labels),
        positive_label=view.positive_label,
        threshold=view.threshold,
        base_model_id=view.base_model_id,
        prompt_version=view.prompt_version,
        is_default=view.is_default,
        metrics=view.metrics,
    )


def read_tokens(text: str) -> frozenset[str]:
    """Bearer tokens from a tokens file: one per line; blank lines and # comments skipped."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(line for line in lines if line)


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless `authorization: Bearer <token>` names an accepted token.

    The health service is exempt, so probes need no secret.
    """

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(token.encode() for token in tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._accepts(handler_call_details.invocation_metadata or ()):
            return handler
        return _denying(handler)

    def _accepts(self, metadata: Any) -> bool:
        for key, value in metadata:
            if key.lower() != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token:
                given = token.strip().encode()
                # compare_digest against every token: the time taken says nothing.
                matches = [hmac.compare_digest(given, accepted) for accepted in self._tokens]
                return any(matches)
        return False


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    serde = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **serde)
    return grpc.stream_stream_rpc_method_handler(deny, **serde)
