"""The sidecar's decision core: a pure function, tested table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from phishgate.core.errors import ConfigError
from phishgate.milter.policy import (
    ACTION,
    ADAPTER,
    DEFAULT_REJECT_REPLY,
    DEFAULT_TEMPFAIL_REPLY,
    SCORE,
    SPAM_FLAG,
    SPAM_STATUS,
    STATUS,
    VERDICT,
    Action,
    Envelope,
    Policy,
    Scored,
    Thresholds,
    Unscored,
    adapters_for,
    combine,
    decide,
    load_policy,
    skip_reason,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "services" / "milter" / "policy.example.yaml"


def scored(p: float, adapter: str = "phishing", version: str = "3") -> Scored:
    label = "phishing" if p >= 0.5 else "legitimate"
    return Scored(label, p, {"phishing": p, "legitimate": 1 - p}, adapter, version)


def envelope(*recipients: str, **fields: object) -> Envelope:
    values: dict[str, object] = {"sender": "someone@sender.example", "size": 1000}
    values.update(fields)
    return Envelope(recipients=recipients or ("user@corp.example",), **values)  # type: ignore[arg-type]


POLICY = Policy(
    thresholds={"phishing": Thresholds(tag=0.5, quarantine=0.8, reject=0.95)},
    domains={
        "lenient.example": {"thresholds": {"phishing": {"tag": 0.99}}},
        "strict.example": {"thresholds": {"phishing": {"reject": 0.5}}},
        "tenant.example": {"adapter": "tenant", "on_failure": "closed"},
    },
    skip={
        "trusted_networks": ["10.0.0.0/8", "2001:db8::/32"],
        "senders": ["Boss@Corp.example", "@partner.example"],
    },
    max_scan_bytes=10_000,
)


@pytest.mark.parametrize(
    ("p", "action"),
    [
        (0.1, Action.ACCEPT),
        (0.4999, Action.ACCEPT),
        (0.5, Action.TAG),
        (0.79, Action.TAG),
        (0.8, Action.QUARANTINE),
        (0.9499, Action.QUARANTINE),
        (0.95, Action.REJECT),
        (1.0, Action.REJECT),
    ],
)
def test_thresholds_map_a_score_to_an_action(p: float, action: Action) -> None:
    decision = decide(envelope(), {"": scored(p)}, POLICY)
    assert decision.action == action
    assert dict(decision.headers)[ACTION] == str(action)


def test_a_rejected_message_gets_the_configured_reply_and_no_model_name() -> None:
    decision = decide(envelope(), {"": scored(0.99)}, POLICY)
    assert decision.reply == DEFAULT_REJECT_REPLY
    assert decision.reply.startswith("550 5.7.1 ")
    assert not any(word in decision.reply.lower() for word in ("model", "phishgate", "score"))


def test_headers_of_a_scored_message() -> None:
    decision = decide(envelope(), {"": scored(0.61234, version="7")}, POLICY)
    headers = dict(decision.headers)
    assert headers[STATUS] == "scored"
    assert headers[VERDICT] == "phishing"
    assert headers[SCORE] == "0.6123"
    assert headers[ADAPTER] == "phishing; version=7"
    assert SPAM_FLAG not in headers


@pytest.mark.parametrize(("p", "flag"), [(0.2, "NO"), (0.7, "YES")])
def test_spamassassin_compatible_headers(p: float, flag: str) -> None:
    policy = POLICY.model_copy(update={"spamassassin_headers": True})
    headers = dict(decide(envelope(), {"": scored(p)}, policy).headers)
    assert headers[SPAM_FLAG] == flag
    assert headers[SPAM_STATUS].startswith(f"{'Yes' if flag == 'YES' else 'No'}, score={p:.2f} ")
    assert "required=0.50" in headers[SPAM_STATUS]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"client_address": "10.1.2.3"}, "trusted-network"),
        ({"client_address": "2001:db8::1"}, "trusted-network"),
        ({"client_address": "192.0.2.1"}, None),
        ({"client_address": "not-an-ip"}, None),
        ({"auth_user": "alice"}, "authenticated"),
        ({"sender": "boss@corp.EXAMPLE"}, "sender-allowlist"),
        ({"sender": "anyone@partner.example"}, "sender-allowlist"),
        ({"sender": "anyone@sub.partner.example"}, None),
        ({"sender": ""}, None),
        ({"size": 10_001}, "oversize"),
        ({"size": 10_000}, None),
    ],
)
def test_skip_rules(fields: dict[str, object], reason: str | None) -> None:
    assert skip_reason(envelope(**fields), POLICY) == reason


def test_skipped_and_oversize_mail_passes_with_a_status_header() -> None:
    skipped = decide(envelope(auth_user="alice"), {}, POLICY)
    assert skipped.action == Action.ACCEPT
    assert dict(skipped.headers)[STATUS] == "skipped; reason=authenticated"
    oversize = decide(envelope(size=50_000), {}, POLICY)
    assert oversize.action == Action.ACCEPT
    assert dict(oversize.headers)[STATUS] == "unscored; reason=oversize"
    assert VERDICT not in dict(oversize.headers)


def test_authenticated_mail_is_scored_when_the_skip_is_off() -> None:
    policy = POLICY.model_copy(
        update={"skip": POLICY.skip.model_copy(update={"authenticated": False})}
    )
    assert skip_reason(envelope(auth_user="alice"), policy) is None


@pytest.mark.parametrize(
    ("on_failure", "reason", "action", "status"),
    [
        ("open", "unavailable", Action.ACCEPT, "unscored; reason=unavailable"),
        ("open", "timeout", Action.ACCEPT, "unscored; reason=timeout"),
        ("closed", "unavailable", Action.TEMPFAIL, "unscored; reason=unavailable"),
        ("closed", "overloaded", Action.TEMPFAIL, "unscored; reason=overloaded"),
        # A message the classifier cannot read will not get better by retrying.
        ("closed", "invalid-message", Action.ACCEPT, "unscored; reason=invalid-message"),
    ],
)
def test_classifier_failures_follow_the_fail_mode(
    on_failure: str, reason: str, action: Action, status: str
) -> None:
    policy = POLICY.model_copy(update={"on_failure": on_failure})
    decision = decide(envelope(), {"": Unscored(reason)}, policy)  # type: ignore[arg-type]
    assert decision.action == action
    assert dict(decision.headers)[STATUS] == status
    assert decision.reply == (DEFAULT_TEMPFAIL_REPLY if action == Action.TEMPFAIL else None)


def test_domains_route_to_their_adapter_and_fail_mode() -> None:
    env = envelope("a@corp.example", "b@tenant.example", "c@TENANT.example")
    assert adapters_for(env, POLICY) == ("", "tenant")
    # The tenant's adapter is down and its domain fails closed: retry for everyone.
    decision = decide(env, {"": scored(0.1), "tenant": Unscored("unavailable")}, POLICY)
    assert decision.action == Action.TEMPFAIL
    assert dict(decision.per_recipient)["b@tenant.example"] == Action.TEMPFAIL
    assert dict(decision.per_recipient)["a@corp.example"] == Action.ACCEPT


@pytest.mark.parametrize(
    ("actions", "mixed", "expected"),
    [
        ([Action.REJECT, Action.REJECT], "quarantine", Action.REJECT),
        ([Action.ACCEPT, Action.TAG], "quarantine", Action.TAG),
        ([Action.QUARANTINE, Action.REJECT], "quarantine", Action.QUARANTINE),
        ([Action.ACCEPT, Action.REJECT], "quarantine", Action.QUARANTINE),
        ([Action.ACCEPT, Action.REJECT], "tag", Action.TAG),
        ([Action.TAG, Action.QUARANTINE], "tag", Action.TAG),
        ([Action.ACCEPT, Action.TEMPFAIL], "quarantine", Action.TEMPFAIL),
        ([], "quarantine", Action.ACCEPT),
    ],
)
def test_combining_recipients_never_rejects_one_who_accepts(
    actions: list[Action], mixed: str, expected: Action
) -> None:
    assert combine(actions, mixed) == expected  # type: ignore[arg-type]


def test_mixed_recipients_quarantine_in_milter_mode_and_split_in_smtp_mode() -> None:
    env = envelope("x@lenient.example", "y@strict.example")
    decision = decide(env, {"": scored(0.9)}, POLICY)
    assert dict(decision.per_recipient) == {
        "x@lenient.example": Action.ACCEPT,
        "y@strict.example": Action.REJECT,
    }
    assert decision.action == Action.QUARANTINE
    assert decision.reply is None
    deliver, hold = decision.deliveries
    assert (deliver.recipients, deliver.hold) == (("x@lenient.example",), False)
    assert (hold.recipients, hold.hold) == (("y@strict.example",), True)
    assert dict(deliver.headers)[ACTION] == "accept"
    assert dict(hold.headers)[ACTION] == "quarantine"


def test_all_recipients_rejecting_rejects_and_no_delivery_is_planned() -> None:
    decision = decide(envelope("y@strict.example", "z@strict.example"), {"": scored(0.6)}, POLICY)
    assert decision.action == Action.REJECT
    assert decision.deliveries == ()


def test_quarantine_carries_the_reason_and_one_held_delivery() -> None:
    decision = decide(envelope(), {"": scored(0.85)}, POLICY)
    assert decision.action == Action.QUARANTINE
    assert decision.quarantine_reason == POLICY.quarantine_reason
    assert [d.hold for d in decision.deliveries] == [True]


def test_the_example_policy_file_loads() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.domains  # the example shows overrides
    assert load_policy(None) == Policy()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (
            "thresholds:\n  phishing:\n    tag: 0.5\n    quarantin: 0.9\n",
            "thresholds.phishing.quarantin",
        ),
        ("on_failur: open\n", "on_failur"),
        ("thresholds:\n  phishing: {tag: 0.9, quarantine: 0.5}\n", "thresholds.phishing"),
        ("thresholds:\n  phishing: {tag: 1.5}\n", "thresholds.phishing.tag"),
        ("reject_reply: '450 4.7.1 later'\n", "reject_reply"),
        ("tempfail_reply: '451 4.7.1 100% busy'\n", "tempfail_reply"),
        ("skip:\n  trusted_networks: [not-a-net]\n", "skip.trusted_networks.0"),
        ("domains:\n  a.example: {adaptor: x}\n", "domains.a.example.adaptor"),
    ],
)
def test_bad_policy_files_name_the_field(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    assert named in str(caught.value)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_policy(tmp_path / "list.yaml")
