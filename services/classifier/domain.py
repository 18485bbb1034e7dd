"""The classifier's domain: one email in, one verdict out; no gRPC types here.

A request leases the current version of its logical adapter (and of its shadow
challenger, if any), renders the email with the one renderer for that adapter's task and
token budget, scores the champion and the challenger rows in the same engine batch, and
decides with the champion's threshold only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from phishgate.classifier.batcher import MicroBatcher
from phishgate.classifier.engine import EngineRow
from phishgate.classifier.follower import SHADOW_SUFFIX, AdapterSet, LoadedAdapter, shadow_slot
from phishgate.classifier.metrics import ClassifierMetrics
from phishgate.core.errors import InvalidMessage
from phishgate.core.registry import AdapterRef
from phishgate.core.render import RenderedEmail, render_email
from phishgate.core.scoring import Score, decide
from phishgate.core.tasks import PROMPT_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The decision on one email and what it was made with."""

    request_id: str
    score: Score
    adapter: AdapterRef
    model_id: str
    prompt_version: str
    latency_ms: float


@dataclass(frozen=True)
class AdapterView:
    """A logical adapter as ListAdapters shows it."""

    ref: AdapterRef
    labels: tuple[str, ...]
    positive_label: str
    threshold: float
    base_model_id: str
    prompt_version: str
    is_default: bool
    metrics: dict[str, float]


def shadow_agrees(champion: Score, challenger: Score) -> tuple[bool, float]:
    """(same decided label, |score difference|) of a champion and its challenger."""
    return champion.label == challenger.label, abs(champion.score - challenger.score)


class ClassifierService:
    """Classify emails with the served adapters, through the micro-batcher."""

    def __init__(
        self,
        adapters: AdapterSet,
        batcher: MicroBatcher,
        tokenizer: Any,
        render_executor: Executor,
        *,
        default_adapter: str,
        base_short_id: str,
        max_message_bytes: int,
        metrics: ClassifierMetrics,
    ) -> None:
        self.adapters = adapters
        self.batcher = batcher
        self.tokenizer = tokenizer
        self.render_executor = render_executor
        self.default_adapter = default_adapter
        self.base_short_id = base_short_id
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics

    def adapter_name(self, requested: str) -> str:
        return requested or self.default_adapter

    def check_size(self, raw: bytes) -> None:
        """InvalidMessage naming the limit when `raw` is over it, or empty."""
        if len(raw) > self.max_message_bytes:
            raise InvalidMessage(
                f"message is {len(raw)} bytes; the limit is {self.max_message_bytes} bytes"
            )
        if not raw.strip():
            raise InvalidMessage("empty message")

    async def classify(
        self, raw: bytes, adapter: str, request_id: str, *, timeout: float | None = None
    ) -> Verdict:
        """Score `raw` with logical adapter `adapter` ('' for the default).

        InvalidMessage, AdapterNotFound, EngineOverloaded, EngineUnavailable or the
        batcher's DeadlineExceeded on failure.
        """
        started = time.perf_counter()
        self.check_size(raw)
        name = self.adapter_name(adapter)
        with contextlib.ExitStack() as stack:
            champion = stack.enter_context(self.adapters.lease(name))
            challenger = None
            if self.adapters.get(shadow_slot(name)) is not None:
                challenger = stack.enter_context(self.adapters.lease(shadow_slot(name)))
            rendered = await self._render(raw, champion)
            rows = [self._row(rendered, champion)]
            shadow_rendered = None
            if challenger is not None:
                shadow_rendered = rendered
                if (challenger.task, challenger.max_input_tokens) != (
                    champion.task,
                    champion.max_input_tokens,
                ):
                    shadow_rendered = await self._render(raw, challenger)
                rows.append(self._row(shadow_rendered, challenger))
            probabilities = await self.batcher.score(rows, timeout=timeout)
            score = self._decide(probabilities[0], rendered, champion)
            if challenger is not None and shadow_rendered is not None:
                self._observe_shadow(
                    name,
                    request_id,
                    score,
                    self._decide(probabilities[1], shadow_rendered, challenger),
                    challenger,
                )
            ref = champion.ref
        return Verdict(
            request_id=request_id,
            score=score,
            adapter=ref,
            model_id=self.base_short_id,
            prompt_version=rendered.prompt_version,
            latency_ms=(time.perf_counter() - started) * 1000,
        )

    def list_adapters(self) -> list[AdapterView]:
        """The logical adapters served (shadow challengers not included), default first."""
        views = []
        for name, adapter in sorted(self.adapters.slots().items()):
            if name.endswith(SHADOW_SUFFIX):
                continue
            manifest = adapter.manifest
            ref = adapter.ref
            if adapter.cached:
                ref = AdapterRef(ref.name, ref.version, f"{ref.source} (cached: registry down)")
            views.append(
                AdapterView(
                    ref=ref,
                    labels=adapter.task.labels,
                    positive_label=adapter.task.positive_label,
                    threshold=adapter.threshold,
                    base_model_id=self.base_short_id,
                    prompt_version=manifest.prompt_version if manifest else PROMPT_VERSION,
                    is_default=name == self.default_adapter,
                    metrics=dict(manifest.metrics) if manifest else {},
                )
            )
        views.sort(key=lambda view: not view.is_default)
        return views

    async def _render(self, raw: bytes, adapter: LoadedAdapter) -> RenderedEmail:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.render_executor,
            render_email,
            raw,
            adapter.task,
            self.tokenizer,
            adapter.max_input_tokens,
        )

    def _row(self, rendered: RenderedEmail, adapter: LoadedAdapter) -> EngineRow:
        return EngineRow(rendered.prompt_ids, self.adapters.label_ids(adapter.task), adapter.key)

    @staticmethod
    def _decide(
        probabilities: tuple[float, ...], rendered: RenderedEmail, adapter: LoadedAdapter
    ) -> Score:
        return decide(
            probabilities,
            adapter.task,
            adapter.threshold,
            n_tokens=rendered.n_tokens,
            truncated=rendered.truncated,
        )

    def _observe_shadow(
        self,
        name: str,
        request_id: str,
        champion: Score,
        challenger: Score,
        adapter: LoadedAdapter,
    ) -> None:
        agree, delta = shadow_agrees(champion, challenger)
        self.metrics.shadow_agreement.labels(name, "true" if agree else "false").inc()
        self.metrics.shadow_delta.labels(name).observe(delta)
        log.info(
            "shadow %s: champion %s %.4f, challenger v%s %s %.4f",
            name,
            champion.label,
            champion.score,
            adapter.ref.version,
            challenger.label,
            challenger.score,
            extra={"request_id": request_id, "shadow_agree": agree, "score_delta": delta},
        )
