"""The one decision core of the sidecar: (scores, envelope, policy) -> action.

Both front-ends (milter and SMTP content filter) call the same pure functions:

- `skip_reason(envelope, policy)`: mail that is not scored at all (trusted network,
  authenticated sender, allow-listed sender, over the size cap);
- `adapters_for(envelope, policy)`: the logical adapters the recipients' domains route to;
- `decide(envelope, outcomes, policy)`: the action, per recipient and for the message, with
  the headers to add and the SMTP reply to give.

Multi-recipient rule (recipients whose domains have different policies): a milter can only
take one action for the whole message after the body, so when recipients disagree:
recipients that would all be refused are never forced on one that accepts; the message is
rejected only when every recipient rejects; delivering and refusing recipients together
give `policy.mixed_recipients` (quarantine by default, or tag). The SMTP front-end can
split: `Decision.deliveries` sends accepting recipients the tagged message and holds the
rest (see the README).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from phishgate.core.config_files import describe_validation_error, read_yaml_mapping
from phishgate.core.errors import ConfigError

# SMTP replies. Basic codes: RFC 5321 section 4.2 (550 "mailbox unavailable / policy",
# 451 "local error, try again"); enhanced codes: RFC 3463 section 3.8, X.7.1 "delivery not
# authorized, message refused". The texts say nothing about how the decision was made.
DEFAULT_REJECT_REPLY = "550 5.7.1 Message refused by local policy"
DEFAULT_TEMPFAIL_REPLY = "451 4.7.1 Message cannot be checked now, try again later"

HEADER_PREFIX = "X-Phishgate-"
VERDICT, SCORE, ADAPTER, STATUS, ACTION = (
    HEADER_PREFIX + name for name in ("Verdict", "Score", "Adapter", "Status", "Action")
)
SPAM_FLAG, SPAM_STATUS = "X-Spam-Flag", "X-Spam-Status"
QUARANTINE_HEADER_VALUE = "quarantine"
"""`X-Phishgate-Action: quarantine`: what Postfix's header_checks HOLD on (SMTP mode)."""


class Action(IntEnum):
    """What happens to a message, by increasing severity."""

    ACCEPT = 0  # deliver with headers
    TAG = 1  # deliver with headers that mark it (X-Spam-Flag: YES)
    QUARANTINE = 2  # Postfix hold queue, with a reason
    REJECT = 3  # permanent refusal (5xx)
    TEMPFAIL = 4  # temporary refusal (4xx): the sender's MTA retries

    def __str__(self) -> str:
        return self.name.lower()


FailureReason = Literal[
    "unavailable", "timeout", "overloaded", "unknown-adapter", "invalid-message", "error"
]


@dataclass(frozen=True)
class Scored:
    """A classifier answer for one message and one adapter."""

    label: str  # the label the classifier decided (by the adapter's own threshold)
    score: float  # probability of the adapter's positive label
    scores: Mapping[str, float]  # every label's probability
    adapter_name: str
    adapter_version: str


@dataclass(frozen=True)
class Unscored:
    """The classifier did not answer usably; `reason` says why (for headers and metrics)."""

    reason: FailureReason
    detail: str = ""


Outcome = Scored | Unscored


@dataclass(frozen=True)
class Envelope:
    """What the MTA told us about one message besides its content."""

    sender: str  # MAIL FROM address without brackets; "" for the null sender
    recipients: tuple[str, ...]
    size: int  # bytes of the message as received
    client_address: str | None = None  # IP of the SMTP client; None when unknown
    auth_user: str | None = None  # {auth_authen}: SASL login name
    queue_id: str | None = None  # Postfix queue id ({i} or XFORWARD IDENT)


# --- the policy file -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Thresholds(_Strict):
    """Probabilities of one label at or above which an action applies; null: never."""

    tag: Probability | None = None
    quarantine: Probability | None = None
    reject: Probability | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        levels = [v for v in (self.tag, self.quarantine, self.reject) if v is not None]
        if levels != sorted(levels):
            raise ValueError("thresholds must be ordered tag <= quarantine <= reject")
        return self


FailMode = Literal["open", "closed"]


class DomainRule(_Strict):
    """Override for recipients of one domain; unset fields keep the policy's defaults."""

    adapter: str | None = Field(None, description="Logical adapter for this domain.")
    thresholds: dict[str, Thresholds] | None = None
    on_failure: FailMode | None = None


class SkipRules(_Strict):
    """Mail that is passed without scoring (a `skipped` status header is still added)."""

    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    authenticated: bool = Field(True, description="Skip mail from SASL-authenticated clients.")
    senders: tuple[str, ...] = Field(
        (),
        description="Envelope senders to skip: user@domain or @domain (forgeable: use sparingly).",
    )

    @field_validator("senders")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(item.strip().lower() for item in value)


_REPLY = re.compile(r"^([245])\d\d ([245])\.\d{1,3}\.\d{1,3} [\x20-\x24\x26-\x7e]{1,200}$")


def _check_reply(value: str, first_digit: str) -> str:
    match = _REPLY.match(value)
    if not match or match.group(1) != first_digit or match.group(2) != first_digit:
        raise ValueError(
            f"expected '{first_digit}NN {first_digit}.N.N text' (printable ASCII, no '%'), "
            f"got {value!r}"
        )
    return value


class Policy(_Strict):
    """The whole policy file. Unknown keys are an error naming the key."""

    adapter: str = Field("", description="Default logical adapter ('': the server's default).")
    thresholds: dict[str, Thresholds] = Field(
        default_factory=lambda: {"phishing": Thresholds(tag=0.5, quarantine=0.9)},
        description="Per label: probabilities for tag / quarantine / reject.",
    )
    domains: dict[str, DomainRule] = Field(
        default_factory=dict, description="Per recipient domain (lower case): overrides."
    )
    on_failure: FailMode = Field(
        "open", description="Classifier down or late: open = accept unscored, closed = tempfail."
    )
    skip: SkipRules = Field(default_factory=SkipRules)
    max_scan_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Larger mail passes unscored (status oversize)."
    )
    mixed_recipients: Literal["quarantine", "tag"] = Field(
        "quarantine",
        description="One message, recipients that deliver and recipients that refuse: this.",
    )
    reject_reply: str = DEFAULT_REJECT_REPLY
    tempfail_reply: str = DEFAULT_TEMPFAIL_REPLY
    quarantine_reason: str = Field("held for review by local policy", max_length=200)
    spamassassin_headers: bool = Field(
        False, description="Also add X-Spam-Flag / X-Spam-Status (for existing Sieve rules)."
    )

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, value: dict[str, DomainRule]) -> dict[str, DomainRule]:
        return {domain.strip().lower().rstrip("."): rule for domain, rule in value.items()}

    @field_validator("reject_reply")
    @classmethod
    def _reject_is_5xx(cls, value: str) -> str:
        return _check_reply(value, "5")

    @field_validator("tempfail_reply")
    @classmethod
    def _tempfail_is_4xx(cls, value: str) -> str:
        return _check_reply(value, "4")


def load_policy(path: Path | None) -> Policy:
    """The policy in YAML file `path` (None: the defaults); ConfigError naming bad fields."""
    data = read_yaml_mapping(path, "policy file") if path is not None else {}
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"policy file {path}: {describe_validation_error(exc)}") from None


# --- decisions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One re-injection in SMTP mode: these recipients get the message with these headers."""

    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    hold: bool  # carries `X-Phishgate-Action: quarantine`: the next hop holds it


@dataclass(frozen=True)
class Decision:
    """What to do with one message."""

    action: Action  # the one action for the whole message (milter)
    headers: tuple[tuple[str, str], ...]  # to add (name, value), in order
    status: str  # scored | skipped | unscored, as in X-Phishgate-Status
    reply: str | None = None  # SMTP reply for REJECT / TEMPFAIL
    quarantine_reason: str | None = None
    per_recipient: tuple[tuple[str, Action], ...] = ()
    deliveries: tuple[Delivery, ...] = field(default=())  # SMTP mode: may split
    outcome: Outcome | None = None  # the outcome the headers report


def recipient_domain(address: str) -> str:
    """The lower-case domain of an address ('' when it has none)."""
    return address.rpartition("@")[2].strip().lower().rstrip(".>")


def _rule(recipient: str, policy: Policy) -> DomainRule:
    return policy.domains.get(recipient_domain(recipient), DomainRule())


def _adapter(recipient: str, policy: Policy) -> str:
    chosen = _rule(recipient, policy).adapter
    return policy.adapter if chosen is None else chosen


def skip_reason(envelope: Envelope, policy: Policy) -> str | None:
    """Why this message is not scored at all, or None when it is to be scored."""
    if envelope.client_address and policy.skip.trusted_networks:
        try:
            ip = ipaddress.ip_address(envelope.client_address.strip("[]"))
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in policy.skip.trusted_networks):
            return "trusted-network"
    if policy.skip.authenticated and envelope.auth_user:
        return "authenticated"
    sender = envelope.sender.lower()
    if sender and policy.skip.senders:
        domain = "@" + recipient_domain(sender)
        if sender in policy.skip.senders or domain in policy.skip.senders:
            return "sender-allowlist"
    if envelope.size > policy.max_scan_bytes:
        return "oversize"
    return None


def adapters_for(envelope: Envelope, policy: Policy) -> tuple[str, ...]:
    """The distinct logical adapters the recipients route to, in recipient order."""
    recipients = envelope.recipients or ("",)
    return tuple(dict.fromkeys(_adapter(rcpt, policy) for rcpt in recipients))


def action_for_scores(scores: Mapping[str, float], thresholds: Mapping[str, Thresholds]) -> Action:
    """The most severe action any label's probability reaches."""
    action = Action.ACCEPT
    for label, levels in thresholds.items():
        p = scores.get(label)
        if p is None:
            continue
        for level, bar in (
            (Action.REJECT, levels.reject),
            (Action.QUARANTINE, levels.quarantine),
            (Action.TAG, levels.tag),
        ):
            if bar is not None and p >= bar:
                action = max(action, level)
                break
    return action


def _recipient_action(recipient: str, outcome: Outcome, policy: Policy) -> Action:
    rule = _rule(recipient, policy)
    if isinstance(outcome, Unscored):
        if outcome.reason == "invalid-message":
            return Action.ACCEPT  # retrying cannot help; passes with an unscored header
        mode = rule.on_failure or policy.on_failure
        return Action.ACCEPT if mode == "open" else Action.TEMPFAIL
    return action_for_scores(outcome.scores, rule.thresholds or policy.thresholds)


def combine(actions: Sequence[Action], mixed: Literal["quarantine", "tag"]) -> Action:
    """One action for a message whose recipients want `actions` (see the module docstring)."""
    if not actions:
        return Action.ACCEPT
    if Action.TEMPFAIL in actions:
        return Action.TEMPFAIL  # retried later for everyone; nobody is refused for good
    lowest, highest = min(actions), max(actions)
    if lowest == highest:
        return lowest
    if lowest >= Action.QUARANTINE:
        return Action.QUARANTINE  # quarantine and reject: hold, since not all reject
    if highest <= Action.TAG:
        return Action.TAG
    return Action.QUARANTINE if mixed == "quarantine" else Action.TAG


def status_value(outcome: Outcome | None, skipped: str | None) -> str:
    """The X-Phishgate-Status value."""
    if skipped == "oversize":
        return "unscored; reason=oversize"
    if skipped is not None:
        return f"skipped; reason={skipped}"
    if isinstance(outcome, Unscored):
        return f"unscored; reason={outcome.reason}"
    return "scored"


def result_headers(
    outcome: Outcome | None, skipped: str | None, action: Action, policy: Policy
) -> tuple[tuple[str, str], ...]:
    """The headers added to a delivered or held message."""
    headers: list[tuple[str, str]] = [(STATUS, status_value(outcome, skipped))]
    flagged = action >= Action.TAG and action != Action.TEMPFAIL
    if isinstance(outcome, Scored) and skipped is None:
        adapter = outcome.adapter_name or "default"
        headers += [
            (VERDICT, outcome.label),
            (SCORE, f"{outcome.score:.4f}"),
            (ADAPTER, f"{adapter}; version={outcome.adapter_version or 'unknown'}"),
        ]
    headers.append((ACTION, str(action)))
    if policy.spamassassin_headers:
        score = outcome.score if isinstance(outcome, Scored) and skipped is None else 0.0
        required = min(
            (t.tag for t in policy.thresholds.values() if t.tag is not None), default=1.0
        )
        headers += [
            (SPAM_FLAG, "YES" if flagged else "NO"),
            (
                SPAM_STATUS,
                f"{'Yes' if flagged else 'No'}, score={score:.2f} required={required:.2f} "
                f"tests={'PHISHGATE' if flagged else 'none'}",
            ),
        ]
    return tuple(headers)


def decide(envelope: Envelope, outcomes: Mapping[str, Outcome], policy: Policy) -> Decision:
    """The decision for one message.

    `outcomes` maps each adapter of `adapters_for(envelope, policy)` to its classifier
    outcome; it is ignored when `skip_reason` applies. An adapter missing from it counts as
    `Unscored("error")`.
    """
    skipped = skip_reason(envelope, policy)
    recipients = envelope.recipients or ("",)
    if skipped is not None:
        headers = result_headers(None, skipped, Action.ACCEPT, policy)
        per = tuple((rcpt, Action.ACCEPT) for rcpt in recipients)
        return Decision(
            action=Action.ACCEPT,
            headers=headers,
            status=status_value(None, skipped),
            per_recipient=per,
            deliveries=(Delivery(tuple(envelope.recipients), headers, hold=False),),
        )

    missing = Unscored("error", "no outcome for this adapter")
    chosen = [outcomes.get(_adapter(rcpt, policy), missing) for rcpt in recipients]
    actions = [_recipient_action(r, o, policy) for r, o in zip(recipients, chosen, strict=True)]
    action = combine(actions, policy.mixed_recipients)
    # Report the outcome that drove the most severe recipient action (first on ties).
    reported = chosen[actions.index(max(actions))]
    headers = result_headers(reported, None, action, policy)
    decision = Decision(
        action=action,
        headers=headers,
        status=status_value(reported, None),
        per_recipient=tuple(zip(recipients, actions, strict=True)),
        outcome=reported,
    )
    if action == Action.REJECT:
        return replace(decision, reply=policy.reject_reply)
    if action == Action.TEMPFAIL:
        return replace(decision, reply=policy.tempfail_reply)
    reason = policy.quarantine_reason if action == Action.QUARANTINE else None
    return replace(
        decision,
        quarantine_reason=reason,
        deliveries=_split(envelope, chosen, actions, action, policy),
    )


def _split(
    envelope: Envelope,
    chosen: Sequence[Outcome],
    actions: Sequence[Action],
    action: Action,
    policy: Policy,
) -> tuple[Delivery, ...]:
    """SMTP mode: accepting recipients get the message now, refusing ones have it held."""
    if not envelope.recipients:
        return ()
    deliver = [i for i, a in enumerate(actions) if a <= Action.TAG]
    hold = [i for i, a in enumerate(actions) if a >= Action.QUARANTINE]
    if not deliver or not hold:
        return (
            Delivery(
                envelope.recipients,
                _headers(chosen, actions, action, policy),
                hold=action == Action.QUARANTINE,
            ),
        )
    groups = []
    for indexes, group_action in (
        (deliver, max(actions[i] for i in deliver)),
        (hold, Action.QUARANTINE),
    ):
        sub_chosen = [chosen[i] for i in indexes]
        sub_actions = [actions[i] for i in indexes]
        groups.append(
            Delivery(
                tuple(envelope.recipients[i] for i in indexes),
                _headers(sub_chosen, sub_actions, group_action, policy),
                hold=group_action == Action.QUARANTINE,
            )
        )
    return tuple(groups)


def _headers(
    chosen: Sequence[Outcome], actions: Sequence[Action], action: Action, policy: Policy
) -> tuple[tuple[str, str], ...]:
    reported = chosen[list(actions).index(max(actions))]
    return result_headers(reported, None, action, policy)
