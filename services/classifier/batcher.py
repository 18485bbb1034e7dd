"""The dynamic micro-batcher: concurrent requests share the engine's forward passes.

Every engine call (score, load, unload) runs on one worker thread, in submission order,
because engines are not thread-safe. A job (the rows of one request: its champion and,
with shadow scoring, its challenger) waits at most `max_wait_ms` for others; a batch
holds at most `max_batch_size` rows, the oldest job first and then the jobs closest to it
in length, so little compute goes to padding. The queue is bounded (EngineOverloaded
past `max_queue` jobs); jobs whose caller went away or whose deadline passed are dropped
before scoring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from phishgate.classifier.engine import Engine, EngineRow
from phishgate.core.errors import EngineOverloaded, EngineUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

BatchObserver = Callable[[int, float], None]
"""Called after each forward pass with its number of rows and its seconds."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed before its job was scored."""


@dataclass
class _Job:
    rows: tuple[EngineRow, ...]
    future: asyncio.Future[list[tuple[float, ...]]]
    deadline: float | None  # loop.time() after which scoring is pointless
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return max(len(row.prompt_ids) for row in self.rows)


def pick_batch(lengths: Sequence[tuple[int, int]], max_rows: int) -> list[int]:
    """Indices of the jobs to score together, given (length, rows) per job, oldest first.

    The oldest job always goes (no job starves); the others are added closest in length to
    it first, as long as the batch stays within `max_rows` rows.
    """
    if not lengths:
        return []
    first_length, first_rows = lengths[0]
    chosen, total = [0], first_rows
    by_distance = sorted(range(1, len(lengths)), key=lambda i: abs(lengths[i][0] - first_length))
    for i in by_distance:
        if total + lengths[i][1] <= max_rows:
            chosen.append(i)
            total += lengths[i][1]
    return sorted(chosen)


class MicroBatcher:
    """Queues jobs from the event loop and scores them in batches on one engine thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._pending: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def depth(self) -> int:
        """Jobs waiting to be scored."""
        return len(self._pending)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def run_in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the engine thread (loading and unloading adapters)."""
        if self._closed:
            raise EngineUnavailable("the engine is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def score(
        self, rows: Sequence[EngineRow], *, timeout: float | None = None
    ) -> list[tuple[float, ...]]:
        """Label probabilities of `rows`, scored in one forward pass with other jobs' rows.

        EngineOverloaded if the queue is full, EngineUnavailable once closed,
        DeadlineExceeded if `timeout` seconds pass before the job reaches the engine.
        """
        if self._closed or self._worker is None:
            raise EngineUnavailable("the engine is not running")
        if len(rows) > self.max_batch_size:
            raise ValueError(f"{len(rows)} rows exceed the batch size {self.max_batch_size}")
        if len(self._pending) >= self.max_queue:
            raise EngineOverloaded(f"the engine queue is full ({self.max_queue} requests)")
        loop = asyncio.get_running_loop()
        job = _Job(
            tuple(rows),
            loop.create_future(),
            None if timeout is None else loop.time() + timeout,
        )
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    async def close(self) -> None:
        """Stop taking jobs, fail those still queued, and let the engine thread finish."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(EngineUnavailable("the engine is shutting down"))
        self._pending.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait until the oldest job has waited max_wait, or a full batch is queued.
            oldest = self._pending[0].enqueued
            while sum(len(job.rows) for job in self._pending) < self.max_batch_size:
                left = oldest + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), left)
            self._drop_abandoned(loop.time())
            if not self._pending:
                continue
            picked = pick_batch(
                [(job.length, len(job.rows)) for job in self._pending], self.max_batch_size
            )
            batch = [self._pending[i] for i in picked]
            for i in reversed(picked):
                del self._pending[i]
            await self._score(batch)

    def _drop_abandoned(self, now: float) -> None:
        kept = []
        for job in self._pending:
            if job.future.done():  # cancelled: the caller went away
                continue
            if job.deadline is not None and now >= job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            kept.append(job)
        self._pending = kept

    async def _score(self, batch: list[_Job]) -> None:
        rows = [row for job in batch for row in job.rows]
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.score, rows
            )
        except asyncio.CancelledError:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(EngineUnavailable("the engine is shutting down"))
            raise
        except Exception:
            log.exception("engine failed on a batch of %d rows", len(rows))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(EngineUnavailable("the engine failed on this batch"))
            return
        if self._on_batch is not None:
            self._on_batch(len(rows), time.perf_counter() - started)
        offset = 0
        for job in batch:
            part = results[offset : offset + len(job.rows)]
            offset += len(job.rows)
            if not job.future.done():
                job.future.set_result(part)
