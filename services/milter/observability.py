"""Metrics, the health endpoint and structured logs of the sidecar.

GET /healthz answers 200 "ok" while the front-end is listening (503 before), GET /metrics
the Prometheus text format. Log lines are JSON objects (or text) that carry the Postfix
queue id of the message they are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


class SidecarMetrics:
    """The sidecar's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "phishgate_sidecar_messages",
            "Messages decided, by front-end mode, action and status.",
            ["mode", "action", "status"],
            registry=self.registry,
        )
        self.scoring_seconds = Histogram(
            "phishgate_sidecar_scoring_seconds",
            "Time to score one message (all its adapters), classifier round trip included.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.fail_open = Counter(
            "phishgate_sidecar_fail_open",
            "Messages passed unscored because the classifier was down or late.",
            registry=self.registry,
        )
        self.classifier_errors = Counter(
            "phishgate_sidecar_classifier_errors",
            "Failed Classify calls, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "phishgate_sidecar_protocol_errors",
            "Connections closed because the peer broke the milter protocol.",
            registry=self.registry,
        )
        self.next_hop_errors = Counter(
            "phishgate_sidecar_next_hop_errors",
            "SMTP mode: re-injections the next hop refused or could not take.",
            registry=self.registry,
        )


class HealthServer:
    """A minimal HTTP/1.0 server for /healthz and /metrics."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self.ready = False

    async def start(self, host: str, port: int) -> int:
        """Listen on (host, port); the port bound."""
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/healthz":
                status, body, kind = (
                    ("200 OK", b"ok\n", "text/plain")
                    if self.ready
                    else ("503 Service Unavailable", b"starting\n", "text/plain")
                )
            elif path == "/metrics":
                status = "200 OK"
                body, kind = generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST
            else:
                status, body, kind = "404 Not Found", b"not found\n", "text/plain"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value...`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += "".join(f" {k}={v}" for k, v in fields.items() if v is not None)
        return line


def configure_logging(log_format: str, level: str) -> None:
    """Route the `phishgate` loggers to stderr in the chosen format."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("phishgate")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
