"""A gRPC client interceptor that reports every unary call to a callback.

Kept free of locust (importing locust monkey-patches the whole process with gevent): the
locustfile binds the callback to locust's request event; tests bind it to a list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc


class Report(Protocol):
    """Receives one finished call, with the keyword names of locust's request event."""

    def __call__(
        self,
        *,
        request_type: str,
        name: str,
        response_time: float,
        response_length: int,
        exception: BaseException | None,
        context: dict[str, Any],
    ) -> None: ...


class ReportingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Times each unary-unary call from send to final status and reports it.

    `name` is the method's last path element ("Classify"); `response_time` is in ms;
    `response_length` is the serialized response size (0 on failure); `exception` is the
    grpc.RpcError of a failed call, None otherwise. The call's outcome is returned unchanged.
    """

    def __init__(self, report: Report) -> None:
        self._report = report

    def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Any],
        client_call_details: grpc.ClientCallDetails,
        request: Any,
    ) -> Any:
        started = time.perf_counter()
        outcome = continuation(client_call_details, request)
        exception: BaseException | None = None
        length = 0
        try:
            length = outcome.result().ByteSize()
        except grpc.RpcError as error:
            exception = error
        self._report(
            request_type="grpc",
            name=str(client_call_details.method).rsplit("/", 1)[-1],
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )
        return outcome
