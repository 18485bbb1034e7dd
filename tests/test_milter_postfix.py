"""The sidecar in a real mail flow: private Postfix -> sidecar -> real classifier -> sink.

Everything is real: Debian's Postfix (a private instance on loopback high ports), the
sidecar started as `phishgate serve milter`, the classifier started as `phishgate serve
classifier` with the zero-shot base model (which calls most mail phishing at P ~0.85-0.99,
so the policy's per-domain thresholds pick the path: reject.test, hold.test, deliver.test,
closed.test), and an aiosmtpd sink that Postfix relays to. Messages come from
../shared/data. Each message has its own recipient, so it is counted exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import yaml

from phishgate.core.process import ServiceProcess
from phishgate.milter.postfix import (
    PostfixConfig,
    PostfixInstance,
    free_port,
    postfix_available,
    wait_for,
)
from phishgate.milter.sink import MailSink

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.slow,
    pytest.mark.skipif(
        not postfix_available(), reason="Postfix is not installed (/usr/sbin/postfix)"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="a private Postfix's master runs as root"),
]

REPO = Path(__file__).resolve().parent.parent
PHISHGATE = str(Path(sys.executable).with_name("phishgate"))
POLICY = {
    "thresholds": {"phishing": {"tag": 0.5}},
    "domains": {
        "reject.test": {"thresholds": {"phishing": {"reject": 0.3}}},
        "hold.test": {"thresholds": {"phishing": {"quarantine": 0.3}}},
        "deliver.test": {"thresholds": {"phishing": {}}},
        "closed.test": {"thresholds": {"phishing": {}}, "on_failure": "closed"},
    },
    "on_failure": "open",
    "skip": {"authenticated": True},
    "max_scan_bytes": 1024 * 1024,
    "reject_reply": "550 5.7.1 Refused by the test policy",
    "spamassassin_headers": True,
}


# --- the parts -----------------------------------------------------------------------------


class Classifier(ServiceProcess):
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        env = dict(
            os.environ,
            PHISHGATE_HOME=str(REPO / "var"),
            PHISHGATE_CLASSIFIER_PORT=str(self.port),
            PHISHGATE_CLASSIFIER_METRICS_PORT="0",
            PHISHGATE_CLASSIFIER_LOG_FORMAT="text",
            PHISHGATE_MAX_INPUT_TOKENS="128",  # keeps the shared CPU quick; scores stay real
        )
        super().__init__([PHISHGATE, "serve", "classifier"], env, tmp / "classifier.log", REPO)

    def start_serving(self) -> None:
        mark = self.log.stat().st_size if self.log.exists() else 0
        self.start(lambda: "classifier listening on" in self.log.read_text()[mark:])


class Sidecar(ServiceProcess):
    def __init__(self, tmp: Path, mode: str, classifier: str, next_hop: int = 0) -> None:
        self.port, self.health = free_port(), free_port()
        policy = tmp / f"policy-{mode}.yaml"
        policy.write_text(yaml.safe_dump(POLICY))
        env = dict(
            os.environ,
            PHISHGATE_MILTER_LISTEN_PORT=str(self.port),
            PHISHGATE_MILTER_HEALTH_PORT=str(self.health),
            PHISHGATE_MILTER_CLASSIFIER_ADDRESS=classifier,
            PHISHGATE_MILTER_CLASSIFIER_TIMEOUT_MS="45000",
            PHISHGATE_MILTER_PROGRESS_INTERVAL_MS="2000",
            PHISHGATE_MILTER_POLICY_FILE=str(policy),
            PHISHGATE_MILTER_NEXT_HOP=f"127.0.0.1:{next_hop}",
        )
        args = [PHISHGATE, "serve", "milter", "--mode", mode]
        super().__init__(args, env, tmp / f"{mode}.log", REPO)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def decisions(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("logger") == "phishgate.milter.scan"]


@pytest.fixture(scope="module")
def tmp() -> Iterator[Path]:
    # Not pytest's tmp_path: its parents are private to root, Postfix's daemons run as postfix.
    folder = Path(tempfile.mkdtemp(prefix="phishgate-mailflow-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def classifier(tmp: Path, prepared_model: Any) -> Iterator[Classifier]:
    server = Classifier(tmp)
    server.start_serving()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sink() -> Iterator[MailSink]:
    with MailSink() as handler:
        yield handler


@pytest.fixture(scope="module")
def milter_flow(
    tmp: Path, classifier: Classifier, sink: MailSink
) -> Iterator[tuple[PostfixInstance, Sidecar]]:
    sidecar = Sidecar(tmp, "milter", f"127.0.0.1:{classifier.port}")
    postfix = PostfixInstance(
        PostfixConfig(
            root=tmp / "postfix-milter",
            smtpd_port=free_port(),
            relay=("127.0.0.1", sink.port),
            milter=f"inet:127.0.0.1:{sidecar.port}",
            milter_default_action="tempfail",
            milter_content_timeout_s=60,
        )
    )
    with sidecar:  # stopped on the way out, whatever happens
        sidecar.start(sidecar.healthy, 60)
        with postfix:
            yield postfix, sidecar
            print(postfix.log_text()[-5000:])


def _filter_flow(
    tmp: Path, classifier: Classifier, sink: MailSink, name: str, mode: str
) -> Iterator[tuple[PostfixInstance, Sidecar]]:
    """The sidecar in smtp mode behind a Postfix that uses it as `mode`: content_filter
    (after-queue) or proxy_filter (before-queue); it re-injects to Postfix's second smtpd."""
    reinject = free_port()
    sidecar = Sidecar(tmp, "smtp", f"127.0.0.1:{classifier.port}", next_hop=reinject)
    sidecar.log = tmp / f"{name}.log"
    postfix = PostfixInstance(
        PostfixConfig(
            root=tmp / f"postfix-{name}",
            smtpd_port=free_port(),
            relay=("127.0.0.1", sink.port),
            reinject_port=reinject,
            **{mode: ("127.0.0.1", sidecar.port)},  # type: ignore[arg-type]
        )
    )
    with sidecar:  # stopped on the way out, whatever happens
        sidecar.start(sidecar.healthy, 60)
        with postfix:
            yield postfix, sidecar
            print(postfix.log_text()[-5000:])


@pytest.fixture(scope="module")
def smtp_flow(
    tmp: Path, classifier: Classifier, sink: MailSink
) -> Iterator[tuple[PostfixInstance, Sidecar]]:
    yield from _filter_flow(tmp, classifier, sink, "smtp", "content_filter")


@pytest.fixture(scope="module")
def proxy_flow(
    tmp: Path, classifier: Classifier, sink: MailSink
) -> Iterator[tuple[PostfixInstance, Sidecar]]:
    yield from _filter_flow(tmp, classifier, sink, "proxy", "proxy_filter")


# --- mail ----------------------------------------------------------------------------------


def crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def _usable(raw: bytes) -> bool:
    lines = raw.splitlines()
    return (
        0 < len(raw) < 60_000
        and max(len(line) for line in lines) < 900
        and b"\r\n\r\n" in crlf(raw)
    )


def corpus(folder: Path, pattern: str, count: int) -> list[bytes]:
    picked = []
    for path in sorted(folder.glob(pattern)):
        raw = path.read_bytes()
        if _usable(raw):
            picked.append(crlf(raw))
        if len(picked) == count:
            return picked
    pytest.skip(f"not enough usable messages in {folder}")


@pytest.fixture(scope="module")
def phishing(shared_data: Path) -> list[bytes]:
    return corpus(shared_data / "phishing_pot" / "email", "sample-*.eml", 8)


@pytest.fixture(scope="module")
def ham(shared_data: Path) -> list[bytes]:
    return corpus(shared_data / "modern_ham" / "blinux-list" / "messages", "*.eml", 8)


_counter = iter(range(1_000_000))


def rcpt(domain: str) -> str:
    return f"u{next(_counter)}-{os.getpid()}@{domain}"


def send(port: int, raw: bytes, recipients: list[str]) -> tuple[int, bytes]:
    """Submit over SMTP; (250, b"") when accepted, else the refusal's (code, text)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        try:
            client.sendmail("sender@outside.example", recipients, raw)
        except smtplib.SMTPResponseException as exc:
            text = exc.smtp_error
            return exc.smtp_code, text if isinstance(text, bytes) else text.encode()
    return 250, b""


def headers(raw: bytes) -> dict[str, list[str]]:
    parsed = message_from_bytes(raw)
    out: dict[str, list[str]] = {}
    for name, value in parsed.items():
        out.setdefault(name.lower(), []).append(str(value))
    return out


def assert_scored(raw: bytes, tag_at: float | None = None) -> float:
    """Check the headers of a scored message; tagged when its score reaches `tag_at`."""
    h = headers(raw)
    assert h["x-phishgate-status"] == ["scored"]
    (score,) = (float(v) for v in h["x-phishgate-score"])
    assert 0.0 <= score <= 1.0
    action = "tag" if tag_at is not None and score >= tag_at else "accept"
    assert h["x-phishgate-verdict"] == ["phishing" if score >= 0.5 else "legitimate"]
    assert h["x-phishgate-adapter"] == ["phishing; version=zero-shot"]
    assert h["x-phishgate-action"] == [action]
    assert h["x-spam-flag"] == ["YES" if action == "tag" else "NO"]
    return score


def held_for(postfix: PostfixInstance, recipient: str) -> list[dict[str, Any]]:
    return [m for m in postfix.held() if any(r["address"] == recipient for r in m["recipients"])]


# --- milter mode -----------------------------------------------------------------------------


def test_milter_deliver_tag_reject_quarantine(
    milter_flow: tuple[PostfixInstance, Sidecar],
    sink: MailSink,
    ham: list[bytes],
    phishing: list[bytes],
) -> None:
    postfix, sidecar = milter_flow
    port = postfix.config.smtpd_port
    before = len(sidecar.decisions())

    # Ham to a domain that delivers: untouched apart from headers.
    to_ham = rcpt("deliver.test")
    assert send(port, ham[0], [to_ham]) == (250, b"")
    # Phishing to the default policy: tagged, delivered.
    to_tag = rcpt("corp.test")
    assert send(port, phishing[0], [to_tag]) == (250, b"")
    # Phishing to a domain that rejects: the client gets the configured reply.
    to_reject = rcpt("reject.test")
    code, text = send(port, phishing[1], [to_reject])
    assert (code, text) == (550, b"5.7.1 Refused by the test policy")
    # Phishing to a domain that quarantines: accepted, then held by Postfix.
    to_hold = rcpt("hold.test")
    assert send(port, phishing[2], [to_hold]) == (250, b"")
    # Recipients that disagree (deliver + reject): held, nobody refused.
    mixed = [rcpt("deliver.test"), rcpt("reject.test")]
    assert send(port, phishing[3], mixed) == (250, b"")
    # A forged verdict is replaced by ours.
    forged = b"X-Phishgate-Verdict: legitimate\r\nX-Spam-Flag: NO\r\n" + ham[1]
    to_forged = rcpt("corp.test")
    assert send(port, forged, [to_forged]) == (250, b"")

    assert sink.wait([to_ham, to_tag, to_forged])
    (got,) = sink.to(to_ham)
    assert_scored(got)
    assert body_of(got) == body_of(ham[0])
    (tagged,) = sink.to(to_tag)
    tag_score = assert_scored(tagged, tag_at=0.5)
    (forged_got,) = sink.to(to_forged)
    forged_score = assert_scored(forged_got, tag_at=0.5)
    assert len(headers(forged_got)["x-phishgate-verdict"]) == 1
    assert len(headers(forged_got)["x-spam-flag"]) == 1

    wait_for(
        lambda: bool(held_for(postfix, to_hold)) and bool(held_for(postfix, mixed[0])), 30, "held"
    )
    assert held_for(postfix, mixed[0]) == held_for(postfix, mixed[1])
    assert sink.to(to_reject) == [] and sink.to(to_hold) == [] and sink.to(mixed[0]) == []
    # Postfix 3.7 logs "milter triggers HOLD action", not the reason; the sidecar logs that.
    assert "milter-hold: END-OF-MESSAGE" in postfix.log_text()

    # Exactly one decision logged per message, each with its Postfix queue id.
    decisions = sidecar.decisions()[before:]
    assert all(re.fullmatch(r"[0-9A-F]{6,}", d["queue_id"]) for d in decisions)
    tagged_or_not = ["tag" if p >= 0.5 else "accept" for p in (tag_score, forged_score)]
    assert sorted(d["action"] for d in decisions) == sorted(
        ["accept", "reject", "quarantine", "quarantine", *tagged_or_not]
    )


MALFORMED = {
    "broken-mime": (
        b"From: a@outside.example\r\nSubject: broken\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="XYZ"\r\n\r\n--XYZ\r\n'
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"!!!not base64!!!\r\n--XY"
    ),
    "8bit-headers": (
        b"From: J\xf6rg M\xfcller <joerg@outside.example>\r\nSubject: Gr\xfc\xdfe \xe9t\xe9\r\n"
        b"\r\nK\xf6rper mit 8 bit.\r\n"
    ),
    "no-body": b"From: a@outside.example\r\nSubject: only headers\r\n",
    "huge-attachment": (
        b"From: a@outside.example\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n'
        b"\r\nsee attachment\r\n--B\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + (b"QUJD" * 19 + b"\r\n") * 400_000  # 30.4 MB of base64
        + b"--B--\r\n"
    ),
}


def _malformed_roundtrip(postfix: PostfixInstance, sidecar: Sidecar, sink: MailSink) -> None:
    sent = {}
    for name, raw in MALFORMED.items():
        to = rcpt("deliver.test")
        assert send(postfix.config.smtpd_port, raw, [to]) == (250, b""), name
        sent[name] = to
    assert sink.wait(list(sent.values()), 180)
    status = {name: headers(sink.to(to)[0])["x-phishgate-status"] for name, to in sent.items()}
    assert status["huge-attachment"] == ["unscored; reason=oversize"]
    for name in ("broken-mime", "8bit-headers", "no-body"):
        assert status[name][0] in ("scored", "unscored; reason=invalid-message"), name
    assert sidecar.healthy()
    assert sidecar.running()


def test_milter_malformed_mail_gets_a_defined_verdict(
    milter_flow: tuple[PostfixInstance, Sidecar], sink: MailSink
) -> None:
    _malformed_roundtrip(*milter_flow, sink)


def test_milter_classifier_outage_fail_open_and_fail_closed(
    tmp: Path,
    milter_flow: tuple[PostfixInstance, Sidecar],
    classifier: Classifier,
    sink: MailSink,
    ham: list[bytes],
) -> None:
    postfix, _ = milter_flow
    # A sending MTA in front, so that tempfails are retried from a real queue.
    front = PostfixInstance(
        PostfixConfig(
            root=tmp / "postfix-front",
            smtpd_port=free_port(),
            relay=("127.0.0.1", postfix.config.smtpd_port),
            hostname="front.phishgate.test",
        )
    )
    with front:
        # Fail-open, the classifier killed mid-stream: everything is delivered once.
        stream = [rcpt("deliver.test") for _ in range(6)]
        results: list[tuple[int, bytes]] = []

        def sender() -> None:
            for i, to in enumerate(stream):
                results.append(send(postfix.config.smtpd_port, ham[2 + i % 6], [to]))

        thread = threading.Thread(target=sender)
        thread.start()
        assert sink.wait(stream[:1])
        classifier.stop(signal.SIGKILL)
        thread.join(300)
        assert results == [(250, b"")] * len(stream)
        assert sink.wait(stream)
        statuses = [headers(sink.to(to)[0])["x-phishgate-status"] for to in stream]
        assert all(len(sink.to(to)) == 1 for to in stream)
        assert statuses[0] == ["scored"]
        assert ["unscored; reason=unavailable"] in statuses
        assert all(s in (["scored"], ["unscored; reason=unavailable"]) for s in statuses)

        # Fail-closed while it is down: 451 4.7.1, the front queue keeps the mail.
        closed = [rcpt("closed.test") for _ in range(3)]
        for i, to in enumerate(closed):
            assert send(front.config.smtpd_port, ham[i], [to]) == (250, b"")

        def deferred() -> list[dict[str, Any]]:
            return [m for m in front.queue() if m["queue_name"] == "deferred"]

        wait_for(lambda: len(deferred()) == 3, 60, "deferred in the front Postfix")
        reasons = [r["delay_reason"] for m in deferred() for r in m["recipients"]]
        assert all("451 4.7.1" in reason for reason in reasons)
        assert all(sink.to(to) == [] for to in closed)

        # The classifier is back: the queue is flushed, each message arrives scored, once.
        classifier.start_serving()
        front.flush()
        assert sink.wait(closed, 180)
        for to in closed:
            (got,) = sink.to(to)
            assert_scored(got)
        wait_for(lambda: front.queue() == [], 30, "the front queue to empty")


# --- SMTP content-filter mode ------------------------------------------------------------------


def test_content_filter_deliver_reject_quarantine_split(
    smtp_flow: tuple[PostfixInstance, Sidecar],
    sink: MailSink,
    ham: list[bytes],
    phishing: list[bytes],
) -> None:
    postfix, sidecar = smtp_flow
    port = postfix.config.smtpd_port
    before = len(sidecar.decisions())
    to_ham, to_tag = rcpt("deliver.test"), rcpt("corp.test")
    to_reject, to_hold = rcpt("reject.test"), rcpt("hold.test")
    split = [rcpt("deliver.test"), rcpt("hold.test")]
    for raw, recipients in (
        (ham[0], [to_ham]),
        (phishing[0], [to_tag]),
        (phishing[1], [to_reject]),
        (phishing[2], [to_hold]),
        (phishing[3], split),
    ):
        assert send(port, raw, recipients) == (250, b"")  # after-queue: Postfix took it

    assert sink.wait([to_ham, to_tag, split[0]])
    (got,) = sink.to(to_ham)
    assert_scored(got)
    assert body_of(got) == body_of(ham[0])
    assert_scored(sink.to(to_tag)[0], tag_at=0.5)
    (split_got,) = sink.to(split[0])
    assert split_got and split[1] not in [r for _, rs, _ in sink.received for r in rs]

    # Quarantine: re-injected with the marker header, held by the re-injection cleanup.
    wait_for(
        lambda: bool(held_for(postfix, to_hold)) and bool(held_for(postfix, split[1])), 60, "held"
    )

    # Reject after the queue: Postfix bounces to the sender with the policy's reply.
    def bounced() -> list[bytes]:
        return [
            raw for frm, _, raw in sink.received if frm in ("", "<>") and to_reject.encode() in raw
        ]

    wait_for(lambda: bool(bounced()), 60, "the bounce")
    assert b"5.7.1 Refused by the test policy" in bounced()[0]
    assert sink.to(to_reject) == [] and sink.to(to_hold) == []
    decisions = sidecar.decisions()[before:]
    assert len(decisions) == 5
    # The queue id comes with XFORWARD IDENT from Postfix's content-filter transport.
    assert all(re.fullmatch(r"[0-9A-F]{6,}", d["queue_id"]) for d in decisions)


def test_content_filter_malformed_mail_gets_a_defined_verdict(
    smtp_flow: tuple[PostfixInstance, Sidecar], sink: MailSink
) -> None:
    _malformed_roundtrip(*smtp_flow, sink)


def test_content_filter_fail_closed_keeps_mail_queued_until_the_classifier_is_back(
    smtp_flow: tuple[PostfixInstance, Sidecar],
    classifier: Classifier,
    sink: MailSink,
    ham: list[bytes],
) -> None:
    postfix, _ = smtp_flow
    classifier.stop(signal.SIGKILL)
    try:
        closed = [rcpt("closed.test") for _ in range(3)]
        opened = rcpt("deliver.test")
        for i, to in enumerate(closed):
            assert send(postfix.config.smtpd_port, ham[i], [to]) == (250, b"")
        assert send(postfix.config.smtpd_port, ham[4], [opened]) == (250, b"")

        def deferred() -> list[dict[str, Any]]:
            return [m for m in postfix.queue() if m["queue_name"] == "deferred"]

        wait_for(lambda: len(deferred()) == 3, 60, "deferred messages")
        reasons = [r["delay_reason"] for m in deferred() for r in m["recipients"]]
        assert all("451 4.7.1" in reason for reason in reasons)
        assert sink.wait([opened])
        assert headers(sink.to(opened)[0])["x-phishgate-status"] == ["unscored; reason=unavailable"]
    finally:
        classifier.start_serving()
    postfix.flush()
    assert sink.wait(closed, 180)
    for to in closed:
        (got,) = sink.to(to)
        assert_scored(got)
    wait_for(lambda: all(m["queue_name"] == "hold" for m in postfix.queue()), 30, "an empty queue")


# --- SMTP before-queue proxy mode -----------------------------------------------------------


def test_proxy_filter_rejects_to_the_client_and_delivers_the_rest(
    proxy_flow: tuple[PostfixInstance, Sidecar],
    sink: MailSink,
    ham: list[bytes],
    phishing: list[bytes],
) -> None:
    postfix, sidecar = proxy_flow
    port = postfix.config.smtpd_port
    to_ham, to_reject, to_hold = rcpt("deliver.test"), rcpt("reject.test"), rcpt("hold.test")
    assert send(port, ham[5], [to_ham]) == (250, b"")
    # Before the queue, the policy's reply reaches the sending client: no bounce.
    assert send(port, phishing[4], [to_reject]) == (550, b"5.7.1 Refused by the test policy")
    assert send(port, phishing[5], [to_hold]) == (250, b"")
    assert sink.wait([to_ham])
    (got,) = sink.to(to_ham)
    assert_scored(got)
    assert body_of(got) == body_of(ham[5])
    wait_for(lambda: bool(held_for(postfix, to_hold)), 60, "held")
    assert sink.to(to_reject) == [] and sink.to(to_hold) == []
    assert not [raw for frm, _, raw in sink.received if to_reject.encode() in raw]
    # Before the queue there is no queue id yet (XFORWARD carries no IDENT).
    assert sorted(d["action"] for d in sidecar.decisions()) == ["accept", "quarantine", "reject"]
