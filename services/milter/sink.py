"""Where the private Postfix delivers: an aiosmtpd server that keeps every message.

For the demo and the end-to-end tests; a real site's next hop is its mail store.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from aiosmtpd.controller import Controller

from phishgate.milter.postfix import free_port


class MailSink:
    """Keeps (sender, recipients, raw bytes) of each SMTP transaction, on 127.0.0.1:`port`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: list[tuple[str, list[str], bytes]] = []
        self.port = free_port()
        self._controller = Controller(
            self, hostname="127.0.0.1", port=self.port, data_size_limit=None
        )

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    def to(self, recipient: str) -> list[bytes]:
        """Every message delivered to `recipient`, in arrival order."""
        with self._lock:
            return [raw for _, rcpts, raw in self.received if recipient in rcpts]

    def wait(self, recipients: list[str], timeout_s: float = 120) -> bool:
        """True once every recipient got a message; False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not all(self.to(r) for r in recipients):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def __enter__(self) -> MailSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()
