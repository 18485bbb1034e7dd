"""Prometheus metrics of the classifier, on a registry of their own (one per server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_DELTA_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class ClassifierMetrics:
    """Requests, latency, batching, queue depth, labels, adapter swaps, shadow agreement."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "phishgate_classifier_requests",
            "Classify calls by logical adapter and gRPC status code.",
            ["adapter", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "phishgate_classifier_request_seconds",
            "Server-side time of a Classify call.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "phishgate_classifier_batch_rows",
            "Rows per engine forward pass.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "phishgate_classifier_batch_seconds",
            "Time of one engine forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "phishgate_classifier_queue_depth", "Requests waiting for the engine.", registry=r
        )
        self.labels = Counter(
            "phishgate_classifier_labels",
            "Decided labels by logical adapter.",
            ["adapter", "label"],
            registry=r,
        )
        self.swaps = Counter(
            "phishgate_classifier_adapter_swaps",
            "Adapter version changes: swapped, refused (incompatible) or failed.",
            ["adapter", "outcome"],
            registry=r,
        )
        self.loaded_version = Gauge(
            "phishgate_classifier_adapter_loaded",
            "1 for the adapter version each logical name currently serves.",
            ["adapter", "version", "role"],
            registry=r,
        )
        self.shadow_agreement = Counter(
            "phishgate_classifier_shadow_decisions",
            "Champion/challenger decisions on the same request: agree=true|false.",
            ["adapter", "agree"],
            registry=r,
        )
        self.shadow_delta = Histogram(
            "phishgate_classifier_shadow_score_delta",
            "|challenger score - champion score| per request.",
            ["adapter"],
            buckets=_DELTA_BUCKETS,
            registry=r,
        )

    def track_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)

    def serve(self, host: str, port: int) -> Any:
        """Start the /metrics HTTP server on a daemon thread; returns it (has shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
