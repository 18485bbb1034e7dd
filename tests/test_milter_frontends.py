"""The sidecar's two front-ends on real sockets: the milter protocol and the SMTP filter.

The classifier here is a real gRPC server on an ephemeral port whose answers the test
messages choose (header `X-Test-Score`, `X-Test-Delay`, `X-Test-Fail`), so that every
protocol path is driven on purpose; tests/test_milter_postfix.py runs the real model.
The milter peer speaks packets exactly as Postfix's milter8 client sends them.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import grpc
import pytest
from aiosmtpd.controller import Controller
from hypothesis import given, settings
from hypothesis import strategies as st

from phishgate.milter import milter as m
from phishgate.milter.client import ClassifierClient
from phishgate.milter.observability import HealthServer, SidecarMetrics
from phishgate.milter.policy import Policy
from phishgate.milter.postfix import free_port
from phishgate.milter.scanner import Scanner
from phishgate.milter.smtp import ContentFilter, FilterSMTP, rewrite_headers
from phishgate.v1 import classifier_pb2, classifier_pb2_grpc

# --- a classifier whose answers the message chooses --------------------------------------


class ScriptedClassifier(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self) -> None:
        self.requests: list[classifier_pb2.ClassifyRequest] = []

    async def Classify(
        self, request: classifier_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyResponse:
        self.requests.append(request)
        raw = request.raw_message
        delay = re.search(rb"^X-Test-Delay: ([0-9.]+)", raw, re.M)
        if delay:
            await asyncio.sleep(float(delay.group(1)))
        fail = re.search(rb"^X-Test-Fail: (\w+)", raw, re.M)
        if fail:
            await context.abort(grpc.StatusCode[fail.group(1).decode()], "scripted failure")
        found = re.search(rb"^X-Test-Score: ([0-9.]+)", raw, re.M)
        p = float(found.group(1)) if found else 0.1
        return classifier_pb2.ClassifyResponse(
            request_id=request.request_id,
            label="phishing" if p >= 0.5 else "legitimate",
            score=p,
            scores=[
                classifier_pb2.LabelScore(label="legitimate", score=1 - p),
                classifier_pb2.LabelScore(label="phishing", score=p),
            ],
            threshold=0.5,
            adapter=classifier_pb2.AdapterRef(name=request.adapter or "phishing", version="s1"),
        )


POLICY = Policy.model_validate(
    {
        "thresholds": {"phishing": {"tag": 0.5, "quarantine": 0.8, "reject": 0.95}},
        "domains": {
            "lenient.example": {"thresholds": {"phishing": {"tag": 0.5}}},
            "closed.example": {"on_failure": "closed"},
        },
        "max_scan_bytes": 8192,
        "spamassassin_headers": True,
    }
)


@dataclass
class Stack:
    classifier: ScriptedClassifier
    scanner: Scanner
    metrics: SidecarMetrics
    client: ClassifierClient
    address: str


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    scripted = ScriptedClassifier()
    server = grpc.aio.server()
    classifier_pb2_grpc.add_ClassifierServicer_to_server(scripted, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    client = ClassifierClient(address, 5.0, max_message_bytes=POLICY.max_scan_bytes)
    metrics = SidecarMetrics()
    yield Stack(scripted, Scanner(POLICY, client, metrics, "test"), metrics, client, address)
    await client.close()
    await server.stop(None)


def message(*headers: str, body: str = "Hello,\r\nsee you tomorrow.\r\n") -> bytes:
    head = ["From: Alice <alice@sender.example>", "Subject: lunch", *headers]
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


# --- the milter codec ------------------------------------------------------------------


POSTFIX_OPTNEG = struct.pack("!III", 6, 0x1FF, 0x1FFFFF)  # what Postfix 3.x offers


def test_optneg_takes_what_is_offered_and_wanted() -> None:
    version, actions, protocol = m.parse_optneg(POSTFIX_OPTNEG)
    reply = m.optneg_reply(version, actions, protocol)
    length, command = struct.unpack("!Ic", reply[:5])
    assert (length, command) == (13, b"O")
    v, a, p = struct.unpack("!III", reply[5:])
    assert v == 6
    assert a == m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS | m.SMFIF_QUARANTINE
    assert p & m.SMFIP_HDR_LEADSPC and p & m.SMFIP_NR_HDR and not p & m.SMFIP_NR_BODY
    # An MTA that offers less gets no more than it offered.
    _, a2, p2 = struct.unpack("!III", m.optneg_reply(2, m.SMFIF_ADDHDRS, 0)[5:])
    assert (a2, p2) == (m.SMFIF_ADDHDRS, 0)
    with pytest.raises(m.ProtocolError):
        m.optneg_reply(1, 0x1FF, 0)
    with pytest.raises(m.ProtocolError):
        m.parse_optneg(b"\0\0\0\6")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"mail.example.org\x004\x19\x8b192.0.2.7\x00", ("mail.example.org", "192.0.2.7")),
        (b"[2001:db8::1]\x006\x00\x19IPv6:2001:db8::1\x00", ("[2001:db8::1]", "IPv6:2001:db8::1")),
        (b"localhost\x00L\x00\x00/run/sock\x00", ("localhost", None)),
        (b"unknown\x00U", ("unknown", None)),
    ],
)
def test_connect_packets(data: bytes, expected: tuple[str, str | None]) -> None:
    assert m.parse_connect(data) == expected


def test_macros_addresses_and_headers() -> None:
    stage, macros = m.parse_macros(b"Mi\x00ABC123\x00{auth_authen}\x00alice\x00")
    assert (stage, macros) == (b"M", {"i": "ABC123", "auth_authen": "alice"})
    assert m.parse_address_args(b"<a@b.example>\x00SIZE=100\x00BODY=8BITMIME\x00") == (
        "a@b.example",
        ["SIZE=100", "BODY=8BITMIME"],
    )
    assert m.parse_address_args(b"<>\x00") == ("", [])
    assert m.parse_header(b"Subject\x00 hi there\x00") == (b"Subject", b" hi there")
    for bad in (b"Subject hi", b"Subject\x00hi"):
        with pytest.raises(m.ProtocolError):
            m.parse_header(bad)
    with pytest.raises(m.ProtocolError):
        m.split_strings(b"no terminator")


def test_response_packets() -> None:
    assert m.add_header("X-A", "b", leading_space=True) == struct.pack("!I", 8) + b"hX-A\0 b\0"
    assert m.delete_header(b"X-A", 2) == struct.pack("!I", 10) + b"m\0\0\0\2X-A\0\0"
    assert m.reply_code("550 5.7.1 no") == struct.pack("!I", 14) + b"y550 5.7.1 no\0"
    assert m.quarantine("why")[4:] == b"qwhy\0"


async def _packets(data: bytes) -> list[tuple[bytes, bytes]]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while True:
        try:
            out.append(await m.read_packet(reader))
        except asyncio.IncompleteReadError:
            return out


async def test_read_packet_rejects_bad_framing() -> None:
    assert await _packets(m.encode(b"Q") + m.encode(b"A")) == [(b"Q", b""), (b"A", b"")]
    for bad in (b"\0\0\0\0", struct.pack("!I", m.MAX_PACKET + 1) + b"B", m.encode(b"Z")):
        with pytest.raises(m.ProtocolError):
            await _packets(bad)


# --- the milter server, driven like Postfix drives it --------------------------------------


@dataclass
class FakeMta:
    """The MTA side of one milter connection (packets as Postfix's milter8 sends them)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: int = 0
    log: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    async def open(cls, port: int) -> FakeMta:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        mta = cls(reader, writer)
        writer.write(m.encode(m.OPTNEG, POSTFIX_OPTNEG))
        command, data = await mta.read()
        assert command == b"O"
        mta.protocol = struct.unpack("!III", data)[2]
        await mta.step(m.MACRO, b"Cj\0mx.example\0{daemon_name}\0smtpd\0", reply=False)
        await mta.step(m.CONNECT, b"client.example\x004\x04\x00203.0.113.9\x00")
        return mta

    async def read(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack("!I", await self.reader.readexactly(4))
        packet = await self.reader.readexactly(length)
        self.log.append((packet[:1], packet[1:]))
        return packet[:1], packet[1:]

    async def step(self, command: bytes, data: bytes, reply: bool = True) -> None:
        self.writer.write(m.encode(command, data))
        await self.writer.drain()
        if reply:
            assert await self.read() == (b"c", b"")

    async def send_message(
        self, raw: bytes, recipients: tuple[str, ...] = ("bob@corp.example",)
    ) -> list[tuple[bytes, bytes]]:
        """MAIL..EOM for `raw`; the responses to end-of-message, the final one last."""
        head, _, body = raw.partition(b"\r\n\r\n")
        await self.step(m.MACRO, b"Mi\x00A1B2C3\x00{mail_addr}\x00alice@sender.example\x00", False)
        await self.step(m.MAIL, b"<alice@sender.example>\x00")
        for rcpt in recipients:
            await self.step(m.RCPT, f"<{rcpt}>\0".encode())
        for line in re.split(rb"\r\n(?![ \t])", head):
            name, _, value = line.partition(b":")
            await self.step(m.HEADER, name + b"\0" + value + b"\0", reply=False)
        await self.step(m.EOH, b"")
        for start in range(0, len(body), 65535):
            await self.step(m.BODY, body[start : start + 65535])
        self.writer.write(m.encode(m.BODYEOB))
        responses = []
        while True:
            command, data = await self.read()
            responses.append((command, data))
            if command in (b"a", b"y", b"t", b"c"):
                return responses

    async def close(self) -> None:
        self.writer.write(m.encode(m.QUIT))
        self.writer.close()


@pytest.fixture
async def milter_port(stack: Stack) -> AsyncIterator[int]:
    server = m.MilterServer(stack.scanner, progress_interval_s=0.2)
    _, port = await server.start("127.0.0.1", 0)
    yield port
    await server.close()


def added(responses: list[tuple[bytes, bytes]]) -> dict[str, str]:
    out = {}
    for command, data in responses:
        if command == b"h":
            name, value = data.rstrip(b"\0").split(b"\0")
            out[name.decode()] = value.decode().strip()
    return out


async def test_ham_is_accepted_with_headers_and_scored_byte_for_byte(
    stack: Stack, milter_port: int
) -> None:
    mta = await FakeMta.open(milter_port)
    raw = message("X-Test-Score: 0.2", "Folded: first\r\n\tsecond")
    responses = await mta.send_message(raw)
    assert responses[-1] == (b"a", b"")
    headers = added(responses)
    assert headers["X-Phishgate-Status"] == "scored"
    assert headers["X-Phishgate-Verdict"] == "legitimate"
    assert headers["X-Phishgate-Score"] == "0.2000"
    assert headers["X-Phishgate-Adapter"] == "phishing; version=s1"
    assert headers["X-Spam-Flag"] == "NO"
    (request,) = stack.classifier.requests
    assert request.raw_message == raw
    assert request.request_id == "A1B2C3"  # the Postfix queue id ({i})
    await mta.close()


@pytest.mark.parametrize(
    ("score", "final", "extra"),
    [
        ("0.97", (b"y", b"550 5.7.1 Message refused by local policy\0"), None),
        ("0.85", (b"a", b""), b"q"),
        ("0.6", (b"a", b""), None),
    ],
)
async def test_reject_quarantine_tag(
    stack: Stack, milter_port: int, score: str, final: tuple[bytes, bytes], extra: bytes | None
) -> None:
    mta = await FakeMta.open(milter_port)
    responses = await mta.send_message(message(f"X-Test-Score: {score}"))
    assert responses[-1] == final
    commands = [c for c, _ in responses]
    assert (b"q" in commands) == (extra == b"q")
    if final[0] == b"a":
        assert added(responses)["X-Spam-Flag"] == "YES"
    await mta.close()


async def test_classifier_failures_follow_the_fail_mode(stack: Stack, milter_port: int) -> None:
    mta = await FakeMta.open(milter_port)
    failing = message("X-Test-Fail: UNAVAILABLE")
    opened = await mta.send_message(failing)
    assert opened[-1] == (b"a", b"")
    assert added(opened)["X-Phishgate-Status"] == "unscored; reason=unavailable"
    closed = await mta.send_message(failing, recipients=("bob@closed.example",))
    assert closed[-1] == (b"y", b"451 4.7.1 Message cannot be checked now, try again later\0")
    assert stack.metrics.fail_open._value.get() == 1
    assert stack.metrics.classifier_errors.labels("unavailable")._value.get() == 2
    await mta.close()


async def test_a_late_classifier_hits_the_deadline(stack: Stack) -> None:
    hurried = ClassifierClient(stack.address, 0.3, max_message_bytes=POLICY.max_scan_bytes)
    scanner = Scanner(POLICY, hurried, stack.metrics, "test")
    server = m.MilterServer(scanner, progress_interval_s=5)
    _, port = await server.start("127.0.0.1", 0)
    mta = await FakeMta.open(port)
    started = asyncio.get_running_loop().time()
    responses = await mta.send_message(message("X-Test-Delay: 3"))
    assert asyncio.get_running_loop().time() - started < 2
    assert added(responses)["X-Phishgate-Status"] == "unscored; reason=timeout"
    await mta.close()
    await server.close()
    await hurried.close()


async def test_progress_is_sent_while_the_classifier_is_slow(
    stack: Stack, milter_port: int
) -> None:
    mta = await FakeMta.open(milter_port)
    responses = await mta.send_message(message("X-Test-Delay: 0.7", "X-Test-Score: 0.3"))
    assert [c for c, _ in responses].count(b"p") >= 2
    assert responses[-1] == (b"a", b"")
    await mta.close()


async def test_forged_verdict_headers_are_deleted(stack: Stack, milter_port: int) -> None:
    mta = await FakeMta.open(milter_port)
    raw = message(
        "X-Phishgate-Verdict: legitimate",
        "X-Spam-Flag: NO",
        "x-phishgate-verdict: legitimate",
        "X-Test-Score: 0.6",
    )
    responses = await mta.send_message(raw)
    deletes = [d for c, d in responses if c == b"m"]
    # Last occurrence first, values empty (= delete).
    assert deletes == [
        struct.pack("!I", 2) + b"x-phishgate-verdict\0\0",
        struct.pack("!I", 1) + b"X-Spam-Flag\0\0",
        struct.pack("!I", 1) + b"X-Phishgate-Verdict\0\0",
    ]
    await mta.close()


async def test_many_messages_per_connection_and_abort(stack: Stack, milter_port: int) -> None:
    mta = await FakeMta.open(milter_port)
    await mta.step(m.MAIL, b"<first@sender.example>\x00")
    await mta.step(m.HEADER, b"Subject\x00 aborted\x00", reply=False)
    await mta.step(m.ABORT, b"", reply=False)
    for n in range(3):
        responses = await mta.send_message(message(f"X-Test-Score: 0.{n + 1}"))
        assert responses[-1] == (b"a", b"")
    assert [r.raw_message for r in stack.classifier.requests] == [
        message(f"X-Test-Score: 0.{n + 1}") for n in range(3)
    ]
    await mta.close()


async def test_unix_socket_listener(stack: Stack, tmp_path: Any) -> None:
    server = m.MilterServer(stack.scanner, progress_interval_s=1)
    path = str(tmp_path / "milter.sock")
    assert await server.start("", 0, unix_path=path) == (path, 0)
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(m.encode(m.OPTNEG, POSTFIX_OPTNEG))
    assert (await reader.readexactly(5))[4:] == b"O"
    writer.close()
    await server.close()


async def test_oversize_mail_passes_unscored(stack: Stack, milter_port: int) -> None:
    mta = await FakeMta.open(milter_port)
    responses = await mta.send_message(message(body="x" * 70 + "\r\n" * 200 + "y" * 100_000))
    assert added(responses)["X-Phishgate-Status"] == "unscored; reason=oversize"
    assert stack.classifier.requests == []
    await mta.close()


@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(m.COMMANDS)), st.binary(max_size=48)),
        min_size=1,
        max_size=12,
    )
)
@settings(max_examples=150, deadline=None)
def test_any_packet_sequence_is_handled_or_refused_cleanly(
    packets: list[tuple[bytes, bytes]],
) -> None:
    """Arbitrary packets: the session answers or raises ProtocolError, nothing else."""

    async def run() -> None:
        # A real client to a closed port: every scoring attempt fails fast (fail open).
        client = ClassifierClient("127.0.0.1:9", 0.5, max_message_bytes=POLICY.max_scan_bytes)
        sent: list[bytes] = []

        async def send(packet: bytes) -> None:
            sent.append(packet)

        scanner = Scanner(POLICY, client, SidecarMetrics(), "fuzz")
        session = m.MilterSession(scanner, send, progress_interval_s=1)
        try:
            for command, data in packets:
                try:
                    if not await session.handle(command, data):
                        break
                except m.ProtocolError:
                    break
        finally:
            await client.close()
        assert all(struct.unpack("!I", p[:4])[0] == len(p) - 4 for p in sent)

    asyncio.run(run())


@pytest.mark.parametrize(
    "garbage",
    [
        b"\0\0\0\0",  # zero length
        b"\xff\xff\xff\xff",  # absurd length
        m.encode(b"Z", b"what"),  # unknown command
        m.encode(m.OPTNEG, b"\0\0"),  # short negotiation
        m.encode(m.CONNECT, b"host-without-nul"),
        m.encode(m.MAIL, b"<a@b>"),  # address not NUL-terminated
        m.encode(m.HEADER, b"Subject"),
        m.encode(m.MACRO, b""),
    ],
)
async def test_a_bad_packet_closes_only_its_connection(
    stack: Stack, milter_port: int, garbage: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", milter_port)
    writer.write(m.encode(m.OPTNEG, POSTFIX_OPTNEG))
    writer.write(garbage)
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(), 5))[4:5] == b"O"  # then EOF: closed
    writer.close()
    # The server still serves everybody else.
    mta = await FakeMta.open(milter_port)
    assert (await mta.send_message(message()))[-1] == (b"a", b"")
    await mta.close()
    assert stack.metrics.protocol_errors._value.get() == 1


async def test_health_and_metrics_endpoint(stack: Stack, milter_port: int) -> None:
    health = HealthServer(stack.metrics)
    port = await health.start("127.0.0.1", 0)

    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        return data

    assert (await get("/healthz")).startswith(b"HTTP/1.0 503")
    health.ready = True
    assert (await get("/healthz")).startswith(b"HTTP/1.0 200")
    mta = await FakeMta.open(milter_port)
    await mta.send_message(message("X-Test-Score: 0.97"))
    await mta.close()
    metrics = (await get("/metrics")).decode()
    assert 'phishgate_sidecar_messages_total{action="reject",mode="test",status="scored"} 1.0' in (
        metrics
    )
    assert "phishgate_sidecar_scoring_seconds_count 1.0" in metrics
    await health.close()


# --- the SMTP content filter ------------------------------------------------------------


class Sink:
    """A next hop that records what it accepted (or answers `reply`)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], list[str], bytes]] = []
        self.reply = "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reply.startswith("250"):
            self.received.append(
                (envelope.mail_from, envelope.rcpt_tos, envelope.mail_options, envelope.content)
            )
        return self.reply


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    yield handler, port
    controller.stop()


@pytest.fixture
async def filter_port(stack: Stack, sink: tuple[Sink, int]) -> AsyncIterator[int]:
    handler = ContentFilter(stack.scanner, ("127.0.0.1", sink[1]), timeout_s=5)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FilterSMTP(handler, data_size_limit=20_000, enable_SMTPUTF8=True),
        "127.0.0.1",
        0,
    )
    yield server.sockets[0].getsockname()[1]
    server.close()


async def send(port: int, raw: bytes, recipients: list[str], **kwargs: Any) -> tuple[int, str]:
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False) as client:
        try:
            _, reply = await client.sendmail("alice@sender.example", recipients, raw, **kwargs)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return 250, reply


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


async def test_filter_delivers_ham_after_the_next_hop_took_it(
    filter_port: int, sink: tuple[Sink, int]
) -> None:
    raw = message("X-Phishgate-Verdict: legitimate", "X-Test-Score: 0.3")
    code, reply = await send(filter_port, raw, ["bob@corp.example"])
    assert (code, reply) == (250, "2.0.0 Ok: filtered")
    ((_, rcpts, _, got),) = sink[0].received
    assert rcpts == ["bob@corp.example"]
    assert body_of(got) == body_of(raw)
    assert got.count(b"X-Phishgate-Verdict:") == 1
    assert b"X-Phishgate-Verdict: legitimate\r\n" in got  # ours, not the forged one
    assert b"X-Phishgate-Score: 0.3000\r\n" in got


async def test_filter_rejects_and_quarantines(filter_port: int, sink: tuple[Sink, int]) -> None:
    assert await send(filter_port, message("X-Test-Score: 0.99"), ["bob@corp.example"]) == (
        550,
        "5.7.1 Message refused by local policy",
    )
    assert sink[0].received == []
    assert (await send(filter_port, message("X-Test-Score: 0.9"), ["bob@corp.example"]))[0] == 250
    ((_, _, _, held),) = sink[0].received
    assert b"X-Phishgate-Action: quarantine\r\n" in held


async def test_filter_splits_recipients_who_disagree(
    filter_port: int, sink: tuple[Sink, int]
) -> None:
    code, _ = await send(
        filter_port, message("X-Test-Score: 0.99"), ["a@lenient.example", "b@corp.example"]
    )
    assert code == 250
    delivered = {tuple(r): body for _, r, _, body in sink[0].received}
    assert b"X-Phishgate-Action: tag\r\n" in delivered[("a@lenient.example",)]
    assert b"X-Phishgate-Action: quarantine\r\n" in delivered[("b@corp.example",)]


async def test_filter_tempfails_when_the_next_hop_cannot_take_it(
    filter_port: int, sink: tuple[Sink, int]
) -> None:
    sink[0].reply = "451 4.3.0 busy"
    assert await send(filter_port, message(), ["bob@corp.example"]) == (
        451,
        "4.4.0 Next hop unavailable, try again later",
    )
    sink[0].reply = "554 5.0.0 no"
    assert (await send(filter_port, message(), ["bob@corp.example"]))[0] == 554


async def test_filter_tempfails_when_the_next_hop_is_down(stack: Stack) -> None:
    handler = ContentFilter(stack.scanner, ("127.0.0.1", 9), timeout_s=2)  # nothing on 9
    server = await asyncio.get_running_loop().create_server(
        lambda: FilterSMTP(handler), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    assert (await send(port, message(), ["bob@corp.example"]))[0] == 451
    server.close()


async def test_filter_fail_closed_and_size_limit(filter_port: int, sink: tuple[Sink, int]) -> None:
    failing = message("X-Test-Fail: DEADLINE_EXCEEDED")
    assert (await send(filter_port, failing, ["bob@closed.example"]))[0] == 451
    assert (await send(filter_port, failing, ["bob@corp.example"]))[0] == 250
    assert b"unscored; reason=timeout" in sink[0].received[-1][3]
    assert (await send(filter_port, message(body="z" * 900 + "\r\n") * 30, ["b@c.example"]))[
        0
    ] == 552


async def test_filter_passes_smtputf8_and_8bit(filter_port: int, sink: tuple[Sink, int]) -> None:
    raw = "From: Zoë <zoë@sender.example>\r\nSubject: Grüße\r\n\r\nÇa va?\r\n".encode()
    code, _ = await send(
        filter_port, raw, ["bob@corp.example"], mail_options=["SMTPUTF8", "BODY=8BITMIME"]
    )
    assert code == 250
    ((_, _, options, got),) = sink[0].received
    assert "SMTPUTF8" in options and "BODY=8BITMIME" in options
    assert body_of(got) == "Ça va?\r\n".encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b"A: 1\r\nX-Phishgate-Score: 0.0\r\n\tfolded\r\nB: 2\r\n\r\nbody\r\n",
            b"A: 1\r\nB: 2\r\nX-New: v\r\n\r\nbody\r\n",
        ),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\nX-New: v\r\n\r\n"),
        (b"A: 1", b"A: 1\r\nX-New: v\r\n\r\n"),
        (b"A: 1\n\nlf body\n", b"A: 1\nX-New: v\r\n\nlf body\n"),
    ],
)
def test_rewrite_headers_keeps_the_body(raw: bytes, expected: bytes) -> None:
    assert rewrite_headers(raw, (("X-New", "v"),)) == expected
