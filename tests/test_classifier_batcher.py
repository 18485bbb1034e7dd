"""The micro-batcher: batching, length-aware grouping, back-pressure, dropped requests.

The engine here is a small recording one: the batcher, not the model, is under test.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from phishgate.classifier.batcher import DeadlineExceeded, MicroBatcher, pick_batch
from phishgate.classifier.engine import EngineRow
from phishgate.core.errors import EngineOverloaded, EngineUnavailable


class RecordingEngine:
    """Scores a row as (0, its length); records each batch's row lengths and the threads."""

    name = "recording"

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.delay = delay

    def load_adapter(self, key: str, path: Path) -> None: ...

    def unload_adapter(self, key: str) -> None: ...

    def adapter_keys(self) -> frozenset[str]:
        return frozenset()

    def score(self, rows: Sequence[EngineRow]) -> list[tuple[float, ...]]:
        self.threads.add(threading.get_ident())
        self.batches.append([len(row.prompt_ids) for row in rows])
        time.sleep(self.delay)
        return [(0.0, float(len(r.prompt_ids))) for r in rows]

    def close(self) -> None: ...


def row(length: int) -> EngineRow:
    return EngineRow(tuple(range(length)), (1, 2), None)


def test_pick_batch_keeps_the_oldest_and_groups_by_length() -> None:
    assert pick_batch([], 4) == []
    jobs = [(50, 1), (10, 1), (48, 1), (90, 1), (52, 2), (11, 1)]
    assert pick_batch(jobs, 4) == [0, 2, 4]  # 50 with 48 and the two rows of 52
    assert pick_batch(jobs, 1) == [0]
    assert pick_batch([(10, 2), (10, 2)], 3) == [0]  # a job's rows are never split


async def test_concurrent_jobs_share_a_batch_on_one_engine_thread() -> None:
    engine = RecordingEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_ms=50, max_queue=16)
    batcher.start()
    results = await asyncio.gather(*(batcher.score([row(n)]) for n in (5, 6, 7, 8)))
    assert results == [[(0.0, 5.0)], [(0.0, 6.0)], [(0.0, 7.0)], [(0.0, 8.0)]]
    assert engine.batches == [[5, 6, 7, 8]]
    pair = await batcher.score([row(3), row(4)])  # a champion and its shadow: one job
    assert pair == [(0.0, 3.0), (0.0, 4.0)] and engine.batches[-1] == [3, 4]
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads
    await batcher.close()
    with pytest.raises(EngineUnavailable):
        await batcher.score([row(1)])


async def test_a_full_queue_is_refused_and_abandoned_jobs_are_not_scored() -> None:
    engine = RecordingEngine(delay=0.2)
    batcher = MicroBatcher(engine, max_batch_size=1, max_wait_ms=0, max_queue=2)
    batcher.start()
    first = asyncio.create_task(batcher.score([row(1)]))
    await asyncio.sleep(0.05)  # the first job is on the engine now; the queue is empty
    expired = asyncio.create_task(batcher.score([row(2)], timeout=0.05))
    cancelled = asyncio.create_task(batcher.score([row(3)]))
    await asyncio.sleep(0)
    with pytest.raises(EngineOverloaded):
        await batcher.score([row(4)])
    cancelled.cancel()
    assert await first == [(0.0, 1.0)]
    with pytest.raises(DeadlineExceeded):
        await expired
    assert engine.batches == [[1]]  # neither the expired nor the cancelled job reached it
    await batcher.close()
