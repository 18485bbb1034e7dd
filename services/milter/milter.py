"""The Sendmail/Postfix milter protocol, version 6, natively on asyncio.

Wire format (libmilter's mfdef.h, as Postfix's milter8 speaks it): every packet is a
4-byte big-endian length (command byte included), one command byte, then the data. The
MTA sends commands (SMFIC_*); the filter answers with responses (SMFIR_*). Strings are
NUL-terminated.

Flow for each SMTP connection: OPTNEG (negotiate actions and protocol steps), then per
message MACRO/MAIL, MACRO/RCPT..., HEADER..., EOH, BODY chunks, BODYEOB. At BODYEOB the
session scores the message through the `Scanner` (sending SMFIR_PROGRESS while it waits)
and answers with header changes, maybe SMFIR_QUARANTINE, then ACCEPT or a REPLYCODE
(reject / tempfail). ABORT resets the message, QUIT_NC the connection, QUIT ends it.

Robustness: a malformed packet (bad length, unknown command, truncated data) closes that
one connection; the server keeps serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from phishgate.milter.policy import Action, Decision, Envelope
from phishgate.milter.scanner import Scanner, is_own_header

log = logging.getLogger("phishgate.milter")

PROTOCOL_VERSION = 6
MAX_PACKET = 1024 * 1024 + 1024  # > the largest body chunk an MTA may send (SMFIP_MDS_1M)

# Commands, MTA -> filter (SMFIC_*).
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO = b"A", b"B", b"C", b"D", b"E", b"H"
QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT = b"K", b"L", b"M", b"N", b"O", b"Q"
RCPT, DATA, UNKNOWN = b"R", b"T", b"U"
COMMANDS = frozenset(
    (ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT)
) | {DATA, UNKNOWN}

# Responses, filter -> MTA (SMFIR_*).
R_ACCEPT, R_CONTINUE, R_ADDHEADER, R_CHGHEADER = b"a", b"c", b"h", b"m"
R_PROGRESS, R_QUARANTINE, R_REPLYCODE, R_OPTNEG = b"p", b"q", b"y", b"O"

# Actions the filter may take (SMFIF_*).
SMFIF_ADDHDRS, SMFIF_CHGHDRS, SMFIF_QUARANTINE = 0x01, 0x10, 0x20
WANTED_ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_QUARANTINE

# Protocol steps the filter may skip or not answer (SMFIP_*).
SMFIP_NOHELO, SMFIP_NR_HDR, SMFIP_NOUNKNOWN = 0x02, 0x80, 0x100
SMFIP_NODATA, SMFIP_HDR_LEADSPC = 0x200, 0x100000
SMFIP_NR_CONN, SMFIP_NR_HELO, SMFIP_NR_MAIL = 0x1000, 0x2000, 0x4000
SMFIP_NR_RCPT, SMFIP_NR_DATA, SMFIP_NR_UNKN = 0x8000, 0x10000, 0x20000
SMFIP_NR_EOH, SMFIP_NR_BODY = 0x40000, 0x80000
# Skip HELO/DATA/unknown; no replies for headers (fewer round trips); header values with
# their leading space, so that the message is rebuilt byte for byte.
WANTED_PROTOCOL = SMFIP_NOHELO | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_NR_HDR | SMFIP_HDR_LEADSPC

_NO_REPLY = {
    CONNECT: SMFIP_NR_CONN,
    HELO: SMFIP_NR_HELO,
    MAIL: SMFIP_NR_MAIL,
    RCPT: SMFIP_NR_RCPT,
    DATA: SMFIP_NR_DATA,
    UNKNOWN: SMFIP_NR_UNKN,
    HEADER: SMFIP_NR_HDR,
    EOH: SMFIP_NR_EOH,
    BODY: SMFIP_NR_BODY,
}


class ProtocolError(Exception):
    """The peer broke the milter protocol; the connection is closed."""


# --- codec (pure) ------------------------------------------------------------------------


def encode(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    return struct.pack("!I", len(data) + 1) + command + data


async def read_packet(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(command, data) of the next packet; IncompleteReadError at EOF, ProtocolError if bad."""
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    if length < 1 or length > MAX_PACKET:
        raise ProtocolError(f"packet length {length} out of range")
    packet = await reader.readexactly(length)
    command, data = packet[:1], packet[1:]
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command!r}")
    return command, data


def split_strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings; ProtocolError when the last one is not terminated."""
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise ProtocolError("string not NUL-terminated")
    return data[:-1].split(b"\0")


def parse_optneg(data: bytes) -> tuple[int, int, int]:
    """(version, actions, protocol) offered by the MTA."""
    if len(data) < 12:
        raise ProtocolError("short OPTNEG")
    version, actions, protocol = struct.unpack("!III", data[:12])
    return version, actions, protocol


def optneg_reply(version: int, actions: int, protocol: int) -> bytes:
    """Our OPTNEG answer: the wanted actions and steps the MTA offered, at most version 6."""
    if version < 2:
        raise ProtocolError(f"milter protocol version {version} is too old")
    return encode(
        R_OPTNEG,
        struct.pack(
            "!III",
            min(version, PROTOCOL_VERSION),
            actions & WANTED_ACTIONS,
            protocol & WANTED_PROTOCOL,
        ),
    )


def parse_macros(data: bytes) -> tuple[bytes, dict[str, str]]:
    """(stage command, {name: value}) of an SMFIC_MACRO; braces are dropped from names."""
    if not data:
        raise ProtocolError("empty MACRO")
    parts = split_strings(data[1:])
    if len(parts) % 2:
        parts = parts[:-1]  # a name without a value: ignore it
    macros = {
        _text(name).strip("{}"): _text(value)
        for name, value in zip(parts[::2], parts[1::2], strict=True)
    }
    return data[:1], macros


def parse_connect(data: bytes) -> tuple[str, str | None]:
    """(client host name, client IP or None for a Unix socket / unknown family)."""
    host, sep, rest = data.partition(b"\0")
    if not sep:
        raise ProtocolError("CONNECT without host name")
    if not rest:
        raise ProtocolError("CONNECT without family")
    family = rest[:1]
    if family in (b"4", b"6"):
        if len(rest) < 4:
            raise ProtocolError("CONNECT: short address")
        address = split_strings(rest[3:])
        return _text(host), _text(address[0]) if address else None
    return _text(host), None


def parse_address_args(data: bytes) -> tuple[str, list[str]]:
    """(address without <>, ESMTP args) of a MAIL or RCPT command."""
    parts = split_strings(data)
    if not parts:
        raise ProtocolError("MAIL/RCPT without address")
    address = _text(parts[0]).strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address, [_text(part) for part in parts[1:]]


def parse_header(data: bytes) -> tuple[bytes, bytes]:
    """(name, value) of an SMFIC_HEADER (the value as sent, leading space included)."""
    name, sep, rest = data.partition(b"\0")
    if not sep or not rest.endswith(b"\0"):
        raise ProtocolError("malformed HEADER")
    return name, rest[:-1]


def add_header(name: str, value: str, leading_space: bool) -> bytes:
    """SMFIR_ADDHEADER: append a header at the end of the header section."""
    text = (" " + value) if leading_space else value
    return encode(R_ADDHEADER, name.encode() + b"\0" + text.encode() + b"\0")


def delete_header(name: bytes, index: int) -> bytes:
    """SMFIR_CHGHEADER with an empty value: delete the `index`-th (1-based) `name` header."""
    return encode(R_CHGHEADER, struct.pack("!I", index) + name + b"\0\0")


def reply_code(reply: str) -> bytes:
    """SMFIR_REPLYCODE: reject (5xx) or tempfail (4xx) with this exact SMTP reply."""
    return encode(R_REPLYCODE, reply.encode("ascii") + b"\0")


def quarantine(reason: str) -> bytes:
    """SMFIR_QUARANTINE: Postfix puts the message in the hold queue with this reason."""
    return encode(R_QUARANTINE, reason.encode("ascii", "replace") + b"\0")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def decision_packets(
    decision: Decision, headers: list[tuple[bytes, bytes]], leading_space: bool
) -> list[bytes]:
    """The end-of-message responses for `decision`, the final one last.

    Our own headers already on the message (X-Phishgate-*, X-Spam-*) are deleted first, so
    that a sender cannot forge a verdict; deleting from the last occurrence down keeps the
    indexes right whichever way the MTA counts them.
    """
    if decision.action in (Action.REJECT, Action.TEMPFAIL):
        assert decision.reply is not None
        return [reply_code(decision.reply)]
    packets = []
    counts: dict[bytes, int] = {}
    forged: list[tuple[bytes, int]] = []
    for name, _ in headers:
        key = name.lower()
        counts[key] = counts.get(key, 0) + 1
        if is_own_header(name.decode("latin-1")):
            forged.append((name, counts[key]))
    packets += [delete_header(name, index) for name, index in reversed(forged)]
    packets += [add_header(name, value, leading_space) for name, value in decision.headers]
    if decision.action == Action.QUARANTINE:
        packets.append(quarantine(decision.quarantine_reason or "held"))
    packets.append(encode(R_ACCEPT))
    return packets


# --- one connection ----------------------------------------------------------------------


@dataclass
class _Message:
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    macros: dict[str, str] = field(default_factory=dict)


class MilterSession:
    """The protocol state of one MTA connection. `send` writes packets to the MTA."""

    def __init__(
        self,
        scanner: Scanner,
        send: Callable[[bytes], Awaitable[None]],
        progress_interval_s: float,
    ) -> None:
        self._scanner = scanner
        self._send = send
        self._progress_s = progress_interval_s
        self._protocol = 0  # negotiated SMFIP_* flags
        self._client: str | None = None
        self._conn_macros: dict[str, str] = {}
        self._message = _Message()

    async def handle(self, command: bytes, data: bytes) -> bool:
        """Process one packet; False when the connection is to be closed."""
        if command == OPTNEG:
            version, actions, protocol = parse_optneg(data)
            reply = optneg_reply(version, actions, protocol)
            self._protocol = protocol & WANTED_PROTOCOL
            await self._send(reply)
            return True
        if command == QUIT:
            return False
        if command == QUIT_NC:
            self._client, self._conn_macros, self._message = None, {}, _Message()
            return True
        if command == ABORT:
            self._message = _Message()
            return True
        if command == MACRO:
            stage, macros = parse_macros(data)
            target = self._conn_macros if stage in (CONNECT, HELO) else self._message.macros
            target.update(macros)
            return True
        if command == CONNECT:
            _, self._client = parse_connect(data)
        elif command == MAIL:
            macros = self._message.macros  # sent just before MAIL, for this message
            self._message = _Message(macros=macros)
            self._message.sender, _ = parse_address_args(data)
        elif command == RCPT:
            recipient, _ = parse_address_args(data)
            self._message.recipients.append(recipient)
        elif command == HEADER:
            self._add_header(*parse_header(data))
        elif command in (BODY, BODYEOB):
            self._add_body(data)
        if command == BODYEOB:
            await self._end_of_message()
            return True
        if not self._protocol & _NO_REPLY.get(command, 0):
            await self._send(encode(R_CONTINUE))
        return True

    def _add_header(self, name: bytes, value: bytes) -> None:
        message = self._message
        message.headers.append((name, value))
        message.size += len(name) + len(value) + 3  # ":" and CRLF

    def _add_body(self, chunk: bytes) -> None:
        message = self._message
        message.size += len(chunk)
        # Past the scan cap the message passes unscored: keep nothing more of it.
        if message.size <= self._scanner.policy.max_scan_bytes + 2:
            message.body += chunk

    def raw_message(self) -> bytes:
        """The message as received, rebuilt from the header and body packets."""
        lead = b"" if self._protocol & SMFIP_HDR_LEADSPC else b" "
        head = b"".join(
            name + b":" + lead + value + b"\r\n" for name, value in self._message.headers
        )
        return head + b"\r\n" + bytes(self._message.body)

    async def _end_of_message(self) -> None:
        message = self._message
        macro = message.macros.get
        envelope = Envelope(
            sender=message.sender,
            recipients=tuple(message.recipients),
            size=message.size + 2,
            client_address=self._client,
            auth_user=macro("auth_authen") or None,
            queue_id=macro("i") or self._conn_macros.get("i") or None,
        )
        raw = self.raw_message() if envelope.size <= self._scanner.policy.max_scan_bytes else b""
        decision = await self._with_progress(self._scanner.scan(envelope, raw))
        leading = bool(self._protocol & SMFIP_HDR_LEADSPC)
        for packet in decision_packets(decision, message.headers, leading):
            await self._send(packet)
        self._message = _Message()

    async def _with_progress(self, work: Awaitable[Decision]) -> Decision:
        """Await `work`, telling the MTA we are alive every progress interval."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._progress_s)
                if done:
                    return task.result()
                await self._send(encode(R_PROGRESS))
        finally:
            if not task.done():
                task.cancel()


class MilterServer:
    """Accepts MTA connections (TCP or Unix socket) and runs one MilterSession each."""

    def __init__(self, scanner: Scanner, progress_interval_s: float) -> None:
        self._scanner = scanner
        self._progress_s = progress_interval_s
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, unix_path: str | None = None) -> tuple[str, int]:
        """Listen; returns (host, port) actually bound ((path, 0) for a Unix socket)."""
        if unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path)  # a stale socket from a previous run
            self._server = await asyncio.start_unix_server(self._serve, path=unix_path)
            # smtpd runs as another user and needs write access; the folder restricts who.
            os.chmod(unix_path, 0o666)
            return unix_path, 0
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(packet: bytes) -> None:
            writer.write(packet)
            await writer.drain()

        session = MilterSession(self._scanner, send, self._progress_s)
        started = time.monotonic()
        try:
            while True:
                command, data = await read_packet(reader)
                if not await session.handle(command, data):
                    break
        except asyncio.IncompleteReadError:
            pass  # the MTA closed the connection
        except ProtocolError as exc:
            self._scanner.metrics.protocol_errors.inc()
            log.warning("milter protocol error, closing the connection: %s", exc)
        except (ConnectionError, TimeoutError) as exc:
            log.info("milter connection lost: %s", exc)
        except Exception:  # never let one connection take the server down
            self._scanner.metrics.protocol_errors.inc()
            log.exception("unexpected error on a milter connection")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.debug("milter connection closed after %.3f s", time.monotonic() - started)
