"""The path every message takes in both front-ends: skip check, scoring, decision, metrics.

The front-ends (milter, SMTP) turn their protocol into an `Envelope` plus the raw bytes,
call `Scanner.scan`, and turn the `Decision` back into their protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from phishgate.milter.observability import SidecarMetrics
from phishgate.milter.policy import (
    HEADER_PREFIX,
    SPAM_FLAG,
    SPAM_STATUS,
    Action,
    Decision,
    Envelope,
    Outcome,
    Policy,
    Scored,
    Unscored,
    adapters_for,
    decide,
    skip_reason,
)

log = logging.getLogger("phishgate.milter.scan")

_OWN_SPAM_HEADERS = frozenset(name.lower() for name in (SPAM_FLAG, SPAM_STATUS))


def is_own_header(name: str) -> bool:
    """True for a header the sidecar writes; copies arriving with the mail are removed."""
    lowered = name.strip().lower()
    return lowered.startswith(HEADER_PREFIX.lower()) or lowered in _OWN_SPAM_HEADERS


class Classifier(Protocol):
    async def classify(self, raw: bytes, adapter: str, request_id: str) -> Outcome: ...


class Scanner:
    """Scores one message for its recipients and decides what happens to it."""

    def __init__(
        self, policy: Policy, classifier: Classifier, metrics: SidecarMetrics, mode: str
    ) -> None:
        self.policy = policy
        self.metrics = metrics
        self._classifier = classifier
        self._mode = mode

    async def scan(self, envelope: Envelope, raw: bytes) -> Decision:
        """The decision for `raw` (may be b"" when the envelope is over the scan cap)."""
        started = time.perf_counter()
        outcomes: dict[str, Outcome] = {}
        if skip_reason(envelope, self.policy) is None:
            adapters = adapters_for(envelope, self.policy)
            request_id = envelope.queue_id or ""
            results = await asyncio.gather(
                *(self._classifier.classify(raw, adapter, request_id) for adapter in adapters)
            )
            outcomes = dict(zip(adapters, results, strict=True))
            self.metrics.scoring_seconds.observe(time.perf_counter() - started)
        decision = decide(envelope, outcomes, self.policy)
        self._record(envelope, outcomes, decision, time.perf_counter() - started)
        return decision

    def _record(
        self,
        envelope: Envelope,
        outcomes: dict[str, Outcome],
        decision: Decision,
        seconds: float,
    ) -> None:
        status = decision.status.split(";")[0]
        self.metrics.messages.labels(self._mode, str(decision.action), status).inc()
        failures = [o for o in outcomes.values() if isinstance(o, Unscored)]
        for failure in failures:
            self.metrics.classifier_errors.labels(failure.reason).inc()
        outage = any(f.reason != "invalid-message" for f in failures)
        if outage and decision.action != Action.TEMPFAIL:
            self.metrics.fail_open.inc()
        scored = decision.outcome if isinstance(decision.outcome, Scored) else None
        log.info(
            "message %s",
            decision.action,
            extra={
                "fields": {
                    "queue_id": envelope.queue_id,
                    "action": str(decision.action),
                    "status": decision.status,
                    "score": round(scored.score, 4) if scored else None,
                    "label": scored.label if scored else None,
                    "recipients": len(envelope.recipients),
                    "size": envelope.size,
                    "errors": [f"{f.reason}: {f.detail}" for f in failures] or None,
                    "ms": round(seconds * 1000, 1),
                }
            },
        )
