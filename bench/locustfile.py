"""Locust user that calls phishgate.v1.Classifier/Classify with real messages.

Run by `phishgate bench load`; by hand:

    PHISHGATE_BENCH_PAYLOADS=var/reports/bench/payloads \\
        .venv/bin/locust -f bench/locustfile.py --headless -u 8 -r 8 -t 30s \\
        --host 127.0.0.1:50051 --csv var/reports/bench/users-8

`--host` is the classifier's HOST:PORT. Each user holds one channel and sends back to back
(no think time): the sweep over users measures throughput and latency under concurrency.
Every call goes through `ReportingInterceptor` into locust's request event.

Importing this module patches the process for gevent (locust does that on import, and gRPC
must be told before any channel exists); nothing but locust should import it.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]  # no stubs
from locust import User, constant, events, task
from locust.env import Environment

from phishgate.bench.grpc_client import ReportingInterceptor
from phishgate.bench.settings import BenchSettings
from phishgate.v1 import classifier_pb2, classifier_pb2_grpc

grpc_gevent.init_gevent()

_SETTINGS = BenchSettings()


def load_payloads(folder: Path) -> list[bytes]:
    """The raw bytes of every *.eml under `folder`, in name order; ValueError if none."""
    messages = [path.read_bytes() for path in sorted(folder.glob("*.eml"))]
    if not messages:
        raise ValueError(f"no *.eml payloads in {folder}")
    return messages


_PAYLOADS: list[bytes] = []


@events.init.add_listener
def _load(environment: Environment, **_kwargs: object) -> None:
    _PAYLOADS.extend(load_payloads(_SETTINGS.payloads))


class ClassifierUser(User):
    """One caller: a channel of its own, Classify with a random payload, no wait."""

    wait_time = constant(0)

    def on_start(self) -> None:
        if not self.host:
            raise ValueError("--host HOST:PORT of the classifier is required")
        interceptor = ReportingInterceptor(self.environment.events.request.fire)
        self._channel = grpc.intercept_channel(grpc.insecure_channel(self.host), interceptor)
        self._stub = classifier_pb2_grpc.ClassifierStub(self._channel)
        self._sent = 0

    def on_stop(self) -> None:
        self._channel.close()

    @task
    def classify(self) -> None:
        self._sent += 1
        request = classifier_pb2.ClassifyRequest(
            raw_message=random.choice(_PAYLOADS),
            adapter=_SETTINGS.adapter,
            request_id=f"bench-{id(self):x}-{self._sent}",
        )
        # A failed call is already reported to locust by the interceptor.
        with contextlib.suppress(grpc.RpcError):
            self._stub.Classify(request, timeout=_SETTINGS.deadline_s)
