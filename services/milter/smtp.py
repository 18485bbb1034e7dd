"""SMTP content-filter front-end on aiosmtpd, with re-injection to a next hop.

Postfix hands each queued message to this server (after-queue `content_filter`) or proxies
a live SMTP session to it (before-queue `smtpd_proxy_filter`). The message is scored, then
re-injected to `next_hop` (a Postfix smtpd without the filter) with aiosmtplib. The reply to
Postfix is 250 only after the next hop accepted it; when the next hop cannot take it the
reply is 4xx, so Postfix keeps the message queued and retries. Nothing is acknowledged
before it is safe somewhere else.

Quarantine in this mode: the message is re-injected with `X-Phishgate-Action: quarantine`
and the re-injection smtpd's cleanup puts it on hold (`header_checks` with HOLD, see the
README and `phishgate.milter.postfix`). When recipients disagree, accepting ones get the
tagged message and the others get it held: two re-injections (`Decision.deliveries`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from phishgate.milter.policy import Action, Delivery, Envelope
from phishgate.milter.scanner import Scanner, is_own_header

log = logging.getLogger("phishgate.milter.smtp")

# Replies of our own. RFC 5321 section 4.2.2 (451 local error, 554 transaction failed);
# RFC 3463: X.3.0 other mail system status, X.4.0 other network/routing status,
# X.0.0 other undefined status.
REPLY_OK = "250 2.0.0 Ok: filtered"
REPLY_NEXT_HOP_DOWN = "451 4.4.0 Next hop unavailable, try again later"
REPLY_NEXT_HOP_REFUSED = "554 5.0.0 Next hop refused the message"
REPLY_LOCAL_ERROR = "451 4.3.0 Temporary local error, try again later"
_PASSED_OPTIONS = ("BODY=8BITMIME", "SMTPUTF8")


def rewrite_headers(raw: bytes, headers: tuple[tuple[str, str], ...]) -> bytes:
    """`raw` without our own headers it arrived with, `headers` appended to its header.

    The body is left byte for byte as it was.
    """
    for separator in (b"\r\n\r\n", b"\n\n"):
        cut = raw.find(separator)
        if cut != -1:
            head, body = raw[: cut + len(separator) // 2], raw[cut + len(separator) // 2 :]
            break
    else:
        head, body = raw, b"\r\n"  # headers only, no blank line: end the header section
        if head and not head.endswith(b"\n"):
            head += b"\r\n"
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].decode("latin-1")
        dropping = is_own_header(name)
        if not dropping:
            kept.append(line)
    added = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    return b"".join(kept) + added + body


def _xtext_decode(value: str) -> str:
    """RFC 3461 section 4 xtext: "+XX" is the byte XX."""
    out, i = [], 0
    while i < len(value):
        if value[i] == "+" and i + 2 < len(value) + 1:
            try:
                out.append(chr(int(value[i + 1 : i + 3], 16)))
                i += 3
                continue
            except ValueError:
                pass
        out.append(value[i])
        i += 1
    return "".join(out)


class FilterSMTP(SMTP):
    """aiosmtpd's SMTP plus Postfix's XFORWARD (client address and queue id of the mail)."""

    # Be liberal: as a before-queue proxy we see lines as the client sent them.
    line_length_limit = 64 * 1024

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.xforward: dict[str, str] = {}

    @syntax("XFORWARD attribute=value ...")
    async def smtp_XFORWARD(self, arg: str) -> None:
        for item in arg.split():
            name, _, value = item.partition("=")
            value = _xtext_decode(value)
            if value.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                self.xforward[name.upper()] = value
        await self.push("250 2.0.0 Ok")


class ContentFilter:
    """aiosmtpd handler: score at end of DATA, re-inject, answer only after the next hop."""

    def __init__(self, scanner: Scanner, next_hop: tuple[str, int], timeout_s: float) -> None:
        self._scanner = scanner
        self._host, self._port = next_hop
        self._timeout_s = timeout_s

    async def handle_EHLO(
        self,
        server: FilterSMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        server.xforward = {}
        return [*responses[:-1], "250-XFORWARD NAME ADDR PROTO HELO IDENT SOURCE", responses[-1]]

    async def handle_DATA(
        self, server: FilterSMTP, session: Session, envelope: SmtpEnvelope
    ) -> str:
        forwarded, server.xforward = server.xforward, {}
        try:
            return await self._filter(forwarded, session, envelope)
        except Exception:  # a 4xx keeps the mail queued upstream; never a 5xx by accident
            log.exception("content filter failed on a message")
            return REPLY_LOCAL_ERROR

    async def _filter(
        self, forwarded: dict[str, str], session: Session, envelope: SmtpEnvelope
    ) -> str:
        raw: bytes = envelope.original_content or b""
        address = forwarded.get("ADDR") or (session.peer[0] if session.peer else None)
        meta = Envelope(
            sender=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            size=len(raw),
            client_address=address.removeprefix("IPv6:") if address else None,
            queue_id=forwarded.get("IDENT"),
        )
        decision = await self._scanner.scan(meta, raw)
        if decision.action in (Action.REJECT, Action.TEMPFAIL):
            assert decision.reply is not None
            return decision.reply
        options = [o for o in envelope.mail_options if o.upper() in _PASSED_OPTIONS]
        for delivery in decision.deliveries:
            refused = await self._reinject(meta, delivery, raw, options)
            if refused is not None:
                self._scanner.metrics.next_hop_errors.inc()
                return refused
        return REPLY_OK

    async def _reinject(
        self, meta: Envelope, delivery: Delivery, raw: bytes, options: list[str]
    ) -> str | None:
        """Send one delivery to the next hop; None when it took it, else our reply."""
        message = rewrite_headers(raw, delivery.headers)
        started = time.perf_counter()
        client = aiosmtplib.SMTP(
            hostname=self._host, port=self._port, timeout=self._timeout_s, start_tls=False
        )
        try:
            async with client:
                errors, _ = await client.sendmail(
                    meta.sender, list(delivery.recipients), message, mail_options=options
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            permanent = all(e.code >= 500 for e in exc.recipients)
            return self._refused(meta, permanent, str(exc))
        except aiosmtplib.SMTPResponseException as exc:
            return self._refused(meta, exc.code >= 500, f"{exc.code} {exc.message}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning(
                "next hop unavailable: %s", exc, extra={"fields": {"queue_id": meta.queue_id}}
            )
            return REPLY_NEXT_HOP_DOWN
        if errors:  # some recipients refused: retry the whole message rather than lose them
            return self._refused(meta, False, str(errors))
        log.debug(
            "re-injected",
            extra={
                "fields": {
                    "queue_id": meta.queue_id,
                    "hold": delivery.hold,
                    "recipients": len(delivery.recipients),
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                }
            },
        )
        return None

    @staticmethod
    def _refused(meta: Envelope, permanent: bool, detail: str) -> str:
        log.warning(
            "next hop refused the message: %s",
            detail[:300],
            extra={"fields": {"queue_id": meta.queue_id}},
        )
        return REPLY_NEXT_HOP_REFUSED if permanent else REPLY_NEXT_HOP_DOWN
