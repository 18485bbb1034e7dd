"""Adversarial edits: each produces a valid message carrying exactly the intended change."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from phishgate.training.robustness import (
    BENIGN_FILLER,
    EDITS,
    INJECTION_LINE,
    body_in_attachment,
    hidden_text_html,
    homoglyph_links,
    prompt_injection,
    shortened_links,
)

PHISH = (
    b"From: PayPal Service <service@paypa1-secure.example>\r\n"
    b"To: victim@example.org\r\n"
    b"Subject: Your account is limited\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Dear customer, verify your account at https://paypa1-secure.example/login?id=42 today.\r\n"
)


def _parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def _text(raw: bytes) -> str:
    body = _parse(raw).get_body(preferencelist=("plain", "html"))
    assert body is not None
    return str(body.get_content())


def test_prompt_injection_appends_the_line_and_keeps_the_sender() -> None:
    edited = prompt_injection(PHISH)
    assert edited is not None
    assert INJECTION_LINE in _text(edited)
    assert "verify your account" in _text(edited)
    assert "paypa1-secure.example" in str(_parse(edited)["From"])


def test_hidden_text_is_html_only_and_invisible() -> None:
    edited = hidden_text_html(PHISH)
    assert edited is not None
    message = _parse(edited)
    assert message.get_content_type() == "text/html"
    html = _text(edited)
    assert 'style="display:none' in html and BENIGN_FILLER in html
    assert "verify your account" in html


def test_homoglyph_links_change_only_the_host() -> None:
    edited = homoglyph_links(PHISH)
    assert edited is not None
    text = _text(edited)
    url = next(word for word in text.split() if word.startswith("https://"))
    host, _, path = url.removeprefix("https://").partition("/")
    assert path == "login?id=42"
    assert not host.isascii()
    latin = host.translate(str.maketrans("аеосрх", "aeocpx"))
    assert latin == "paypa1-secure.example"


def test_shortened_links_hide_the_destination() -> None:
    edited = shortened_links(PHISH)
    assert edited is not None
    text = _text(edited)
    assert "https://bit.ly/" in text and "paypa1-secure.example/login" not in text


def test_body_in_attachment_moves_the_content() -> None:
    edited = body_in_attachment(PHISH)
    assert edited is not None
    message = _parse(edited)
    assert "verify your account" not in _text(edited)
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["message.html"]
    assert "verify your account" in str(attachments[0].get_content())


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edits_decline_what_they_cannot_edit(name: str) -> None:
    assert EDITS[name](b"\x89PNG\r\n\x1a\n\x00\x00") is None
    no_links = PHISH.replace(b"https://paypa1-secure.example/login?id=42", b"our site")
    if "links" in name:
        assert EDITS[name](no_links) is None
