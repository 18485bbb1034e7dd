"""Wiring: the one place that chooses the engine and assembles the classifier server.

`start` binds the gRPC server first (health NOT_SERVING), then loads the base model, the
engine and the configured adapters on worker threads, and turns health SERVING. `main`
is what `phishgate serve classifier` runs: it logs "classifier listening on HOST:PORT"
(and prints it on stdout) once serving, and stops gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from phishgate.classifier.batcher import MicroBatcher
from phishgate.classifier.domain import ClassifierService
from phishgate.classifier.engine import Engine
from phishgate.classifier.follower import AdapterSet, TaskTokens, shadow_slot
from phishgate.classifier.logs import configure_logging
from phishgate.classifier.metrics import ClassifierMetrics
from phishgate.classifier.settings import ClassifierSettings
from phishgate.classifier.transport import BearerTokenAuth, ClassifierServicer, read_tokens
from phishgate.core.errors import ConfigError, EngineUnavailable
from phishgate.core.model import PreparedModel
from phishgate.core.settings import CoreSettings, load_settings
from phishgate.core.tasks import TASKS, get_task
from phishgate.v1 import classifier_pb2, classifier_pb2_grpc

log = logging.getLogger("phishgate.classifier")

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
REGISTRY_HEALTH = "phishgate.registry"
"""Health entry that is NOT_SERVING while adapters are served from the resolve cache."""
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_PROBE_EMAIL = b"From: probe@example.org\r\nSubject: warm-up\r\n\r\nHello.\r\n"
_MESSAGE_SLACK = 64 * 1024  # room for the request's other fields above max_message_bytes


class _NotReady:
    """Stands in for the service while the model loads: every call is UNAVAILABLE."""

    def __getattr__(self, name: str) -> Any:
        raise EngineUnavailable("the classifier is still loading; retry shortly")


@dataclass
class RunningClassifier:
    """A started classifier server; `port` is the bound one (useful with port 0)."""

    settings: ClassifierSettings
    server: grpc.aio.Server
    port: int
    health: Any
    metrics: ClassifierMetrics
    servicer: ClassifierServicer
    render_executor: ThreadPoolExecutor
    loading: asyncio.Task[None] | None = None
    service: ClassifierService | None = None
    batcher: MicroBatcher | None = None
    adapters: AdapterSet | None = None
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: Any = None
    _stopped: bool = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def ready(self) -> None:
        """Wait until serving; re-raises what made loading fail."""
        if self.loading is not None:
            await asyncio.shield(self.loading)

    async def refresh_adapters(self) -> None:
        """Resolve every adapter source now (what the background task does periodically)."""
        if self.adapters is not None:
            await self.adapters.refresh()
            await self._report_registry()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, finish calls in flight (up to `grace` seconds), free the engine."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self.loading is not None and not self.loading.done():
            self.loading.cancel()
        for task in self._background:
            task.cancel()
        await self.server.stop(grace)
        if self.batcher is not None:
            await self.batcher.close()
            self.batcher.engine.close()
        if self.adapters is not None:
            await self.adapters.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.render_executor.shutdown(wait=False)

    async def _report_registry(self) -> None:
        reasons = self.adapters.degraded() if self.adapters is not None else []
        for reason in reasons:
            log.warning(reason)
        await self.health.set(REGISTRY_HEALTH, _NOT_SERVING if reasons else _SERVING)


async def start(
    settings: ClassifierSettings, core: CoreSettings, *, wait_ready: bool = True
) -> RunningClassifier:
    """Bind and start the server; with `wait_ready`, return once it is SERVING.

    Loading errors (ModelNotPrepared, AdapterNotFound, AdapterMismatch, ConfigError...)
    surface from `ready()` (or from here with `wait_ready`), after the server stopped.
    """
    health = health_aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await health.set(name, _NOT_SERVING)
    interceptors = []
    if settings.auth_tokens_file is not None:
        tokens = read_tokens(_read(settings.auth_tokens_file).decode())
        if not tokens:
            raise ConfigError(f"auth_tokens_file {settings.auth_tokens_file} holds no token")
        interceptors.append(BearerTokenAuth(tokens))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes + _MESSAGE_SLACK),
            ("grpc.so_reuseport", 0),
        ],
    )
    metrics = ClassifierMetrics()
    servicer = ClassifierServicer(
        _NotReady(),  # type: ignore[arg-type]
        metrics,
        stream_concurrency=max(1, settings.max_queue // 2),
    )
    classifier_pb2_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            "grpc.reflection.v1alpha.ServerReflection",
        ),
        server,
    )
    port = _bind(server, settings)
    await server.start()
    running = RunningClassifier(
        settings=settings,
        server=server,
        port=port,
        health=health,
        metrics=metrics,
        servicer=servicer,
        render_executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="render"),
    )
    running.loading = asyncio.get_running_loop().create_task(_load(running, core))
    if wait_ready:
        try:
            await running.ready()
        except BaseException:
            await running.stop(0)
            raise
    return running


async def _load(running: RunningClassifier, core: CoreSettings) -> None:
    settings = running.settings
    base, tokenizer, tokens = await asyncio.to_thread(_prepare, core)
    engine = await asyncio.to_thread(_make_engine, settings, core, base, tokenizer)
    metrics = running.metrics
    batcher = MicroBatcher(
        engine,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        on_batch=metrics.observe_batch,
    )
    running.batcher = batcher
    batcher.start()
    metrics.track_queue(lambda: batcher.depth)
    adapters = AdapterSet(core, base, batcher, tokens, metrics)
    running.adapters = adapters
    if settings.adapters:
        for name, source in sorted(settings.adapters.items()):
            loaded = await adapters.add(name, source)
            log.info("serving %s version %s from %s", name, loaded.ref.version, source)
        for name, source in sorted(settings.shadow.items()):
            loaded = await adapters.add(shadow_slot(name), source)
            log.info("shadow of %s: version %s from %s", name, loaded.ref.version, source)
    else:
        adapters.serve_zero_shot(settings.default_adapter, get_task(settings.default_task))
        log.info("no adapter configured: serving the zero-shot base model %s", base.short_id)
    service = ClassifierService(
        adapters,
        batcher,
        tokenizer,
        running.render_executor,
        default_adapter=settings.default_adapter,
        base_short_id=base.short_id,
        max_message_bytes=settings.max_message_bytes,
        metrics=metrics,
    )
    running.service = service
    running.servicer.service = service
    if settings.metrics_port:
        running._metrics_server = metrics.serve(settings.host, settings.metrics_port)
    await running._report_registry()
    followed = [*settings.adapters.values(), *settings.shadow.values()]
    if settings.refresh_interval_s > 0 and any(s.startswith("models:/") for s in followed):
        running._background.append(asyncio.create_task(_follow(running)))
    for name in ("", SERVICE_NAME):
        await running.health.set(name, _SERVING)


async def _follow(running: RunningClassifier) -> None:
    while True:
        await asyncio.sleep(running.settings.refresh_interval_s)
        await running.refresh_adapters()


def _prepare(core: CoreSettings) -> tuple[PreparedModel, Any, dict[str, TaskTokens]]:
    """The base model (prepared if needed), its tokenizer, and each task's label tokens."""
    from phishgate.core.model import load_tokenizer, prepare_base_model
    from phishgate.core.render import render_email
    from phishgate.core.scoring import label_token_ids

    base = prepare_base_model(core)
    tokenizer = load_tokenizer(base.path)
    tokens = {
        name: TaskTokens(
            label_ids=label_token_ids(tokenizer, task),
            probe_ids=render_email(_PROBE_EMAIL, task, tokenizer, core.max_input_tokens).prompt_ids,
        )
        for name, task in TASKS.items()
    }
    return base, tokenizer, tokens


def resolve_engine(setting: str, vllm_installed: bool) -> str:
    """The engine to run for the `engine` setting: "auto" is vLLM when it is installed."""
    if setting == "auto":
        return "vllm" if vllm_installed else "transformers"
    return setting


def _make_engine(
    settings: ClassifierSettings, core: CoreSettings, base: PreparedModel, tokenizer: Any
) -> Engine:
    engine = resolve_engine(settings.engine, importlib.util.find_spec("vllm") is not None)
    log.info("engine: %s (setting %s)", engine, settings.engine)
    if engine == "vllm":
        from phishgate.classifier.engine_vllm import VllmEngine

        # Room for the longest prompt (the largest budget) plus the one answer token.
        return VllmEngine(
            base.path,
            max_model_len=max(core.max_input_tokens, 512) + 8,
            dtype=None if core.inference_dtype == "auto" else core.inference_dtype,
        )
    import torch

    from phishgate.classifier.engine_transformers import TransformersEngine
    from phishgate.core.model import compute_dtype
    from phishgate.core.scoring import prompt_prefix_ids

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pad = tokenizer.pad_token_id
    return TransformersEngine(
        base.path,
        pad_id=pad if pad is not None else 0,
        device=device,
        dtype=compute_dtype(core.inference_dtype),
        threads=core.torch_threads,
        prefixes=[prompt_prefix_ids(tokenizer, task) for task in TASKS.values()],
        compile=settings.compile,
    )


def _bind(server: grpc.aio.Server, settings: ClassifierSettings) -> int:
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        client_ca = _read(settings.tls_client_ca) if settings.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(_read(settings.tls_key), _read(settings.tls_cert))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise ConfigError(f"cannot listen on {address}")
    return port


def _read(path: Any) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def main() -> None:
    """Run the classifier until SIGTERM/SIGINT (what `phishgate serve classifier` calls)."""
    settings = load_settings(ClassifierSettings)
    core = load_settings(CoreSettings)
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(_serve(settings, core))


async def _serve(settings: ClassifierSettings, core: CoreSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(settings, core, wait_ready=False)
    waiter: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    loading: asyncio.Task[Any] | None = running.loading
    assert loading is not None
    done, _ = await asyncio.wait({loading, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        try:
            await running.ready()
        except BaseException:
            await running.stop(0)
            raise
        log.info("classifier listening on %s", running.address)
        print(f"classifier listening on {running.address}", flush=True)
        await waiter
    log.info("shutting down: finishing requests in flight (up to %.0f s)", settings.grace_s)
    await running.stop(settings.grace_s)
    log.info("classifier stopped")
