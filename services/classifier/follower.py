"""Adapters that follow the MLflow registry (DESIGN invariant 5).

Each logical name (and each shadow challenger) is a slot bound to a source: a
`models:/<name>@<alias>` URI or a local folder. A slot serves one loaded version at a
time. `refresh` resolves every source again; when an alias has moved, the new version is
downloaded, checked against the base model and prompt version (refused and logged
otherwise, the old one keeps serving), loaded under a versioned engine key such as
"phishing@3", warmed with one forward pass, and swapped in. Requests hold a lease on the
version they started with; the old version is unloaded once its last lease is released.

If the registry cannot be reached at start, the version an alias last resolved to (a
record in the resolve cache) is served, and `degraded` says so until a refresh succeeds.
Everything here runs on the event loop; engine work goes through the batcher's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phishgate.classifier.batcher import MicroBatcher
from phishgate.classifier.engine import EngineRow
from phishgate.classifier.metrics import ClassifierMetrics
from phishgate.core.adapters import AdapterManifest, check_compatible, read_manifest
from phishgate.core.errors import AdapterMismatch, AdapterNotFound, EngineUnavailable
from phishgate.core.model import PreparedModel
from phishgate.core.registry import AdapterRef, ResolvedAdapter, parse_models_uri, resolve_adapter
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import Task, get_task

log = logging.getLogger(__name__)

ZERO_SHOT_VERSION = "zero-shot"
SHADOW_SUFFIX = ":challenger"


def shadow_slot(slot: str) -> str:
    """The slot name of `slot`'s shadow challenger."""
    return slot + SHADOW_SUFFIX


def engine_key(slot: str, version: str) -> str:
    """The versioned engine key of a slot's version ("phishing@3"); no dots (PEFT's rule)."""
    return f"{slot}@{version}".replace(".", "_")


@dataclass
class LoadedAdapter:
    """One adapter version as the engine holds it (key None: the bare base model)."""

    slot: str
    key: str | None
    ref: AdapterRef
    task: Task
    threshold: float
    max_input_tokens: int
    manifest: AdapterManifest | None
    cached: bool = False  # served from the resolve cache: the registry was unreachable
    in_flight: int = 0
    retired: bool = False
    unloading: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TaskTokens:
    """Per task: the label words' first tokens and a short prompt to warm adapters with."""

    label_ids: tuple[int, ...]
    probe_ids: tuple[int, ...]


class AdapterSet:
    """The adapter versions being served, by slot, and the swaps between them."""

    def __init__(
        self,
        core: CoreSettings,
        base: PreparedModel,
        batcher: MicroBatcher,
        tokens: dict[str, TaskTokens],
        metrics: ClassifierMetrics,
    ) -> None:
        self._core = core
        self._base = base
        self._batcher = batcher
        self._tokens = tokens
        self._metrics = metrics
        self._cache_dir = core.home / "adapter-cache"
        self._sources: dict[str, str] = {}
        self._current: dict[str, LoadedAdapter] = {}
        self._loaded: dict[str, LoadedAdapter] = {}  # by engine key, retired ones included
        self._refused: dict[str, str] = {}  # slot -> the version last refused (log once)
        self._lock = asyncio.Lock()  # one refresh or swap at a time

    # --- serving ---------------------------------------------------------------------

    def slots(self) -> dict[str, LoadedAdapter]:
        """The version each slot serves now."""
        return dict(self._current)

    def get(self, slot: str) -> LoadedAdapter | None:
        return self._current.get(slot)

    def label_ids(self, task: Task) -> tuple[int, ...]:
        return self._tokens[task.name].label_ids

    @contextlib.contextmanager
    def lease(self, slot: str) -> Iterator[LoadedAdapter]:
        """The slot's current version, kept loaded until the block exits."""
        adapter = self._current.get(slot)
        if adapter is None:
            raise AdapterNotFound(f"adapter {slot!r} is not configured on this server")
        adapter.in_flight += 1
        try:
            yield adapter
        finally:
            adapter.in_flight -= 1
            self._maybe_unload(adapter)

    def degraded(self) -> list[str]:
        """Why the served set may be stale (empty when every source resolved live)."""
        return [
            f"{slot}: registry unreachable, serving cached version {a.ref.version}"
            for slot, a in sorted(self._current.items())
            if a.cached
        ]

    # --- configuration and refresh ----------------------------------------------------

    def serve_zero_shot(self, slot: str, task: Task) -> None:
        """Serve the base model without adapter under `slot` (no adapter configured)."""
        ref = AdapterRef(slot, ZERO_SHOT_VERSION, f"base model {self._base.short_id} (zero-shot)")
        self._current[slot] = LoadedAdapter(
            slot, None, ref, task, 0.5, self._core.max_input_tokens, None
        )
        self._metrics.loaded_version.labels(slot, ZERO_SHOT_VERSION, "champion").set(1)

    async def add(self, slot: str, source: str) -> LoadedAdapter:
        """Resolve and load `source` for `slot`; raises if it cannot be served at all."""
        self._sources[slot] = source
        async with self._lock:
            resolved, cached = await asyncio.to_thread(self._resolve, source)
            check_compatible(resolved.manifest, base_weights_hash=self._base.weights_hash)
            adapter = await self._load(slot, resolved, cached)
            self._install(adapter)
            return adapter

    async def refresh(self) -> None:
        """Resolve every source again; swap in what moved. Never raises for one slot."""
        async with self._lock:
            for slot, source in list(self._sources.items()):
                try:
                    await self._refresh_slot(slot, source)
                except Exception:
                    self._metrics.swaps.labels(slot, "failed").inc()
                    log.exception("refreshing adapter %s from %s failed", slot, source)

    async def follow(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.refresh()

    async def close(self) -> None:
        self._current.clear()
        self._loaded.clear()

    async def _refresh_slot(self, slot: str, source: str) -> None:
        current = self._current[slot]
        try:
            resolved, cached = await asyncio.to_thread(self._resolve, source)
        except EngineUnavailable:
            log.warning(
                "registry unreachable; %s keeps serving version %s", slot, current.ref.version
            )
            return
        if resolved.ref.version == current.ref.version:
            if current.cached and not cached:
                current.cached = False
                log.info(
                    "registry reachable again; %s serves version %s", slot, current.ref.version
                )
            return
        try:
            check_compatible(resolved.manifest, base_weights_hash=self._base.weights_hash)
        except AdapterMismatch as exc:
            if self._refused.get(slot) != resolved.ref.version:
                self._refused[slot] = resolved.ref.version
                self._metrics.swaps.labels(slot, "refused").inc()
                log.error(
                    "refused %s version %s: %s; still serving version %s",
                    slot,
                    resolved.ref.version,
                    exc,
                    current.ref.version,
                )
            return
        adapter = await self._load(slot, resolved, cached)
        self._install(adapter)
        self._metrics.swaps.labels(slot, "swapped").inc()
        log.info("%s: swapped version %s -> %s", slot, current.ref.version, adapter.ref.version)

    def _resolve(self, source: str) -> tuple[ResolvedAdapter, bool]:
        """(the adapter on local disk, whether it came from the cache because the registry
        was unreachable). Runs on a worker thread: MLflow calls block."""
        try:
            resolved = resolve_adapter(self._core, source, self._cache_dir)
        except EngineUnavailable:
            cached = self._cached(source)
            if cached is None:
                raise
            return cached, True
        if source.startswith("models:/"):
            record = self._record_path(source)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"version": resolved.ref.version}) + "\n")
        return resolved, False

    def _cached(self, source: str) -> ResolvedAdapter | None:
        if not source.startswith("models:/"):
            return None
        try:
            version = json.loads(self._record_path(source).read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None
        name, _ = parse_models_uri(source)
        folder = self._cache_dir / name / str(version)
        if not (folder / "adapter_config.json").is_file():
            return None
        return ResolvedAdapter(
            folder, AdapterRef(name, str(version), source), read_manifest(folder)
        )

    def _record_path(self, source: str) -> Path:
        name, ref = parse_models_uri(source)
        return self._cache_dir / name / f"resolved-{ref}.json"

    async def _load(self, slot: str, resolved: ResolvedAdapter, cached: bool) -> LoadedAdapter:
        """Load (or revive a retired) `resolved` under `slot@version`, warmed up."""
        manifest = resolved.manifest
        key = engine_key(slot, resolved.ref.version)
        previous = self._loaded.get(key)
        if previous is not None and previous.unloading is not None:
            await previous.unloading
            previous = None
        if previous is not None:
            previous.retired = False
            previous.cached = cached
            return previous
        task = get_task(manifest.task)
        await self._batcher.run_in_engine(self._batcher.engine.load_adapter, key, resolved.path)
        probe = EngineRow(self._tokens[task.name].probe_ids, self.label_ids(task), key)
        await self._batcher.run_in_engine(self._batcher.engine.score, [probe])
        adapter = LoadedAdapter(
            slot=slot,
            key=key,
            ref=AdapterRef(slot, resolved.ref.version, resolved.ref.source),
            task=task,
            threshold=manifest.threshold,
            max_input_tokens=manifest.max_input_tokens,
            manifest=manifest,
            cached=cached,
        )
        self._loaded[key] = adapter
        return adapter

    def _install(self, adapter: LoadedAdapter) -> None:
        old = self._current.get(adapter.slot)
        self._current[adapter.slot] = adapter  # the swap: new requests lease the new one
        self._refused.pop(adapter.slot, None)
        role = "challenger" if adapter.slot.endswith(SHADOW_SUFFIX) else "champion"
        if old is not None and old is not adapter:
            self._metrics.loaded_version.labels(adapter.slot, old.ref.version, role).set(0)
            old.retired = True
            self._maybe_unload(old)
        self._metrics.loaded_version.labels(adapter.slot, adapter.ref.version, role).set(1)

    def _maybe_unload(self, adapter: LoadedAdapter) -> None:
        if adapter.retired and adapter.in_flight == 0 and adapter.unloading is None:
            if adapter.key is None:
                return
            adapter.unloading = asyncio.get_running_loop().create_task(self._unload(adapter))

    async def _unload(self, adapter: LoadedAdapter) -> None:
        assert adapter.key is not None
        try:
            await self._batcher.run_in_engine(self._batcher.engine.unload_adapter, adapter.key)
            log.info("unloaded %s", adapter.key)
        except Exception:
            log.exception("unloading %s failed", adapter.key)
        finally:
            self._loaded.pop(adapter.key, None)
