"""Wiring of the sidecar: the only place that chooses the front-end and builds the parts.

`phishgate serve milter [--mode milter|smtp]` calls `main`. On start it logs
"<mode> listening on HOST:PORT" (the port actually bound, also with listen_port 0).
SIGTERM / SIGINT stop it: the listener closes, the classifier channel is shut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from phishgate.core.errors import ConfigError
from phishgate.core.settings import load_settings
from phishgate.milter.client import ClassifierClient
from phishgate.milter.milter import MilterServer
from phishgate.milter.observability import HealthServer, SidecarMetrics, configure_logging
from phishgate.milter.policy import load_policy
from phishgate.milter.scanner import Scanner
from phishgate.milter.settings import ENV_PREFIX, MilterSettings, split_host_port
from phishgate.milter.smtp import ContentFilter, FilterSMTP

log = logging.getLogger("phishgate.milter.app")


async def serve(settings: MilterSettings, stop: asyncio.Event | None = None) -> None:
    """Run the sidecar until `stop` is set (or SIGTERM / SIGINT)."""
    policy = load_policy(settings.policy_file)
    try:
        next_hop = split_host_port(settings.next_hop)
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}NEXT_HOP: {exc}") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    metrics = SidecarMetrics()
    client = ClassifierClient(
        settings.classifier_address,
        settings.classifier_timeout_ms / 1000,
        max_message_bytes=policy.max_scan_bytes,
        tls_ca=settings.classifier_tls_ca,
        tls_cert=settings.classifier_tls_cert,
        tls_key=settings.classifier_tls_key,
        token=settings.classifier_token,
    )
    scanner = Scanner(policy, client, metrics, settings.mode)
    health = HealthServer(metrics)
    closers = []
    try:
        if settings.health_port:
            port = await health.start(settings.health_host, settings.health_port)
            closers.append(health.close)
            log.info("health and metrics on %s:%d", settings.health_host, port)
        if settings.mode == "milter":
            milter = MilterServer(scanner, settings.progress_interval_ms / 1000)
            socket_path = settings.unix_socket
            host, port = await milter.start(
                settings.listen_host,
                settings.port,
                str(socket_path) if socket_path else None,
            )
            closers.append(milter.close)
        else:
            handler = ContentFilter(scanner, next_hop, settings.next_hop_timeout_s)
            server = await loop.create_server(
                lambda: FilterSMTP(
                    handler,
                    data_size_limit=settings.max_message_bytes,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    ident="phishgate content filter",
                ),
                settings.listen_host,
                settings.port,
            )
            host, port = server.sockets[0].getsockname()[:2]
            closers.append(_closer(server))
        health.ready = True
        log.info(
            "%s listening on %s:%d",
            settings.mode,
            host,
            port,
            extra={"fields": {"classifier": settings.classifier_address}},
        )
        await stop.wait()
        log.info("stopping")
    finally:
        health.ready = False
        for close in reversed(closers):
            await close()
        await client.close()


def _closer(server: asyncio.Server) -> Any:
    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


def main(mode: str | None = None) -> None:
    """Entry point of `phishgate serve milter`: settings, logs, run until stopped."""
    settings = load_settings(MilterSettings, mode=mode)
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve(settings))
