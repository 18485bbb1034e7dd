"""The demo's mail-flow stage: held-out test mail through Postfix, the sidecar and the classifier.

The classifier serves `models:/phishgate-phishing@champion`; the sidecar runs in milter
mode behind a private Postfix on loopback ports, which relays what it accepts to a sink.
Messages are sent one at a time over SMTP, so each sidecar decision in its log belongs to
the message just sent. Every message ends delivered, held (quarantine) or rejected, and
the stage checks that none is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import smtplib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from phishgate.core.errors import ConfigError
from phishgate.core.process import ServiceProcess
from phishgate.core.registry import CHAMPION, model_name

if TYPE_CHECKING:
    from phishgate.core.settings import CoreSettings
    from phishgate.milter.postfix import PostfixInstance
    from phishgate.milter.sink import MailSink
    from phishgate.training.evaluate import Example

Say = Callable[[str], None]
DOMAIN = "demo.phishgate.test"
SENDER = "sender@outside.example"


@dataclass(frozen=True)
class MailOutcome:
    """One message sent through the gateway."""

    id: str
    truth: str
    subject: str
    action: str  # what the sidecar decided: accept, tag, quarantine, reject, tempfail
    score: float | None
    verdict: str | None
    smtp_reply: str  # what Postfix answered the sender
    final: str  # delivered, held or rejected: where the message is now


def run_mail_flow(
    settings: CoreSettings, data_dir: Path, messages: int, threshold: float, say: Say
) -> list[MailOutcome]:
    """Send `messages` test-split emails (half phishing) through the gateway; their fates.

    The policy quarantines at the adapter's own `threshold` and rejects at 0.9 and above.
    """
    from phishgate.milter.postfix import PostfixConfig, PostfixInstance, free_port
    from phishgate.milter.sink import MailSink

    raws = _pick(data_dir, messages)
    root = settings.home / "demo-mailflow"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    root.chmod(0o755)  # Postfix's daemons run as `postfix`
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump(_policy(threshold)))
    phishgate = str(Path(sys.executable).with_name("phishgate"))
    classifier_port, sidecar_port, health_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PHISHGATE_HOME": str(settings.home)}
    if settings.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    classifier = ServiceProcess(
        [phishgate, "serve", "classifier"],
        {
            **env,
            "PHISHGATE_CLASSIFIER_PORT": str(classifier_port),
            "PHISHGATE_CLASSIFIER_METRICS_PORT": "0",
            "PHISHGATE_CLASSIFIER_ADAPTERS": json.dumps(
                {"phishing": f"models:/{model_name('phishing')}@{CHAMPION}"}
            ),
        },
        root / "classifier.log",
    )
    sidecar = ServiceProcess(
        [phishgate, "serve", "milter", "--mode", "milter"],
        {
            **env,
            "PHISHGATE_MILTER_LISTEN_PORT": str(sidecar_port),
            "PHISHGATE_MILTER_HEALTH_PORT": str(health_port),
            "PHISHGATE_MILTER_CLASSIFIER_ADDRESS": f"127.0.0.1:{classifier_port}",
            "PHISHGATE_MILTER_POLICY_FILE": str(policy),
        },
        root / "milter.log",
    )
    postfix = PostfixInstance(
        PostfixConfig(
            root=root / "postfix",
            smtpd_port=free_port(),
            relay=("127.0.0.1", 0),  # set below, once the sink has its port
            milter=f"inet:127.0.0.1:{sidecar_port}",
            milter_default_action="tempfail",
        )
    )
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(MailSink())
        postfix.config.relay = ("127.0.0.1", sink.port)
        say(f"   classifier on 127.0.0.1:{classifier_port} (log {classifier.log})")
        stack.enter_context(classifier)
        classifier.start(lambda: "classifier listening on" in classifier.log_tail(100_000))
        say(f"   sidecar (milter) on 127.0.0.1:{sidecar_port} (log {sidecar.log})")
        stack.enter_context(sidecar)
        sidecar.start(lambda: _healthy(health_port))
        say(f"   private Postfix on 127.0.0.1:{postfix.config.smtpd_port} -> sink :{sink.port}")
        stack.enter_context(postfix)
        outcomes = [
            _send_one(i, ident, truth, raw, postfix.config.smtpd_port, sidecar, say)
            for i, (ident, truth, raw) in enumerate(raws)
        ]
        settled = _settle(outcomes, postfix, sink)
    return settled


def _pick(data_dir: Path, messages: int) -> list[tuple[str, str, bytes]]:
    """(id, label, raw bytes) of a seeded test-split sample, as many of each label."""
    import random

    from phishgate.training.eval_run import find_raw
    from phishgate.training.evaluate import load_examples

    by_label: dict[str, list[Example]] = {}
    for example in load_examples(data_dir / "test.jsonl"):
        by_label.setdefault(example.label, []).append(example)
    rng = random.Random(1)
    share = -(-messages // len(by_label))  # ceiling
    chosen = [e for label in sorted(by_label) for e in rng.sample(by_label[label], share)]
    rng.shuffle(chosen)
    raws, missing = find_raw(data_dir, chosen[:messages])
    if not raws:
        raise ConfigError(f"none of the test messages could be re-read: {missing}")
    return [(e.id, e.label, raws[e.id]) for e in chosen[:messages] if e.id in raws]


def _policy(threshold: float) -> dict[str, object]:
    reject = max(0.9, threshold)
    return {
        "adapter": "phishing",
        "thresholds": {"phishing": {"tag": None, "quarantine": threshold, "reject": reject}},
        "on_failure": "closed",
        "skip": {"trusted_networks": [], "authenticated": False, "senders": []},
    }


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _send_one(
    i: int, ident: str, truth: str, raw: bytes, port: int, sidecar: ServiceProcess, say: Say
) -> MailOutcome:
    mark = sidecar.log.stat().st_size
    recipient = f"m{i}@{DOMAIN}"
    reply = "250 accepted"
    with smtplib.SMTP("127.0.0.1", port, timeout=180) as client:
        try:
            client.sendmail(SENDER, [recipient], raw)
        except smtplib.SMTPResponseException as exc:
            reply = f"{exc.smtp_code} {_text(exc.smtp_error)}"
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            reply = f"{code} {_text(text)}"
    decision = _decision_after(sidecar, mark)
    subject = _subject(raw)
    outcome = MailOutcome(
        id=ident,
        truth=truth,
        subject=" ".join(subject.split()),
        action=str(decision.get("action", "?")),
        score=decision.get("score"),
        verdict=decision.get("label"),
        smtp_reply=reply,
        final="rejected" if not reply.startswith("250") else "pending",
    )
    say(f"   {i + 1:>2} {truth:<10} -> {outcome.action:<10} {reply[:40]}")
    return outcome


def _subject(raw: bytes) -> str:
    """The decoded Subject, on one line, for the summary table."""
    from email.header import decode_header, make_header

    value = message_from_bytes(raw).get("Subject", "")
    try:
        value = str(make_header(decode_header(str(value))))
    except (LookupError, ValueError, UnicodeError):
        value = str(value)
    return " ".join(value.split())[:70]


def _text(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


def _decision_after(sidecar: ServiceProcess, mark: int, timeout_s: float = 60) -> dict[str, Any]:
    """The first sidecar decision logged after byte `mark` of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sidecar.log.open("rb") as log:
            log.seek(mark)
            for line in log.read().decode(errors="replace").splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("logger") == "phishgate.milter.scan":
                        return dict(record)
        time.sleep(0.1)
    return {}


def _settle(
    outcomes: list[MailOutcome], postfix: PostfixInstance, sink: MailSink
) -> list[MailOutcome]:
    """Where each message ended: delivered (at the sink), held, or rejected at SMTP time.

    Waits up to two minutes for accepted messages to leave Postfix's active queue; one
    that never does is reported as lost, which the summary shows.
    """
    deadline = time.monotonic() + 120
    pending = {i for i, o in enumerate(outcomes) if o.final == "pending"}
    finals: dict[int, str] = {}
    while pending and time.monotonic() < deadline:
        held = {r["address"] for m in postfix.held() for r in m.get("recipients", [])}
        for i in list(pending):
            recipient = f"m{i}@{DOMAIN}"
            if sink.to(recipient):
                finals[i] = "delivered"
            elif recipient in held:
                finals[i] = "held"
            else:
                continue
            pending.discard(i)
        time.sleep(0.3)
    return [
        dataclasses.replace(o, final=finals.get(i, "LOST (still queued)"))
        if o.final == "pending"
        else o
        for i, o in enumerate(outcomes)
    ]
