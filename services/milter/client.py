"""gRPC client of phishgate.v1.Classifier: one Classify call per message and adapter.

This is the transport edge on the sidecar's side: gRPC status codes become `Unscored`
reasons here and nowhere else; the policy decides what a failure means.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from phishgate.milter.policy import FailureReason, Outcome, Scored, Unscored
from phishgate.v1 import classifier_pb2, classifier_pb2_grpc

log = logging.getLogger("phishgate.milter.client")

_REASONS: dict[grpc.StatusCode, FailureReason] = {
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.NOT_FOUND: "unknown-adapter",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid-message",
}


class ClassifierClient:
    """Calls Classify with a deadline; never raises for a failed call, returns Unscored."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        *,
        max_message_bytes: int,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        token: str = "",
    ) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes + 64 * 1024),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # Reconnect fast after a classifier restart, so fail-open windows stay short.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls_ca.read_bytes(),
                private_key=tls_key.read_bytes() if tls_key else None,
                certificate_chain=tls_cert.read_bytes() if tls_cert else None,
            )
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = classifier_pb2_grpc.ClassifierStub(self._channel)

    async def classify(self, raw: bytes, adapter: str, request_id: str) -> Outcome:
        """Score `raw` with logical adapter `adapter` ('' = the server's default)."""
        request = classifier_pb2.ClassifyRequest(
            raw_message=raw, adapter=adapter, request_id=request_id
        )
        try:
            response = await self._stub.Classify(
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            reason = _REASONS.get(exc.code(), "error")
            return Unscored(reason, f"{exc.code().name}: {exc.details() or ''}"[:200])
        return Scored(
            label=response.label,
            score=float(response.score),
            scores={item.label: float(item.score) for item in response.scores},
            adapter_name=response.adapter.name,
            adapter_version=response.adapter.version,
        )

    async def close(self) -> None:
        await self._channel.close(None)
