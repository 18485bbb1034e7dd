"""parse_email and html_to_text: what is kept, what is masked, and every kind of bad input.

Bad inputs are generated here (never copied from the corpora): each gives either a
ParsedEmail with what could be recovered, or InvalidMessage with a specific reason.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import quopri
import time
import zlib
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phishgate.core.errors import InvalidMessage
from phishgate.core.html_text import html_to_text
from phishgate.core.mime import (
    ARCHIVE_SCRUBBED,
    LIST_PLACEHOLDER,
    MAX_LINKS,
    RECIPIENT_PLACEHOLDER,
    Attachment,
    Link,
    ParsedEmail,
    decode_text,
    parse_email,
)

# Generous for a shared CI machine; each case takes well under a tenth of this alone.
TIME_LIMIT_S = 2.0


def message(*headers: str, body: bytes | str = b"") -> bytes:
    """A message from header lines and a body (str bodies are UTF-8)."""
    data = body.encode() if isinstance(body, str) else body
    return "\n".join(headers).encode() + b"\n\n" + data


def part(*headers: str, body: bytes | str = b"") -> bytes:
    return message(*headers, body=body)


def multipart(
    subtype: str, *parts: bytes, boundary: str = "XBOUNDARYX", headers: Sequence[str] = ()
) -> bytes:
    """A multipart message (or part) holding `parts`."""
    lines = [*headers, f'Content-Type: multipart/{subtype}; boundary="{boundary}"']
    body = b"".join(b"--" + boundary.encode() + b"\n" + p + b"\n" for p in parts)
    return message(*lines, body=body + b"--" + boundary.encode() + b"--\n")


def timed_parse(raw: bytes, **limits: int) -> tuple[ParsedEmail, float]:
    start = time.perf_counter()
    parsed = parse_email(raw, **limits)
    return parsed, time.perf_counter() - start


# --- what is read ----------------------------------------------------------------------


def test_plain_message_fields() -> None:
    raw = message(
        'From: "PayPal Service" <no-reply@PayPa1-Secure.com>',
        "Reply-To: collect@elsewhere.example",
        "To: alice@corp.example",
        "Subject: Your account is on hold",
        body="Please verify at https://evil.example/login.\n",
    )
    parsed = parse_email(raw)
    assert parsed.subject == "Your account is on hold"
    assert parsed.from_display == "PayPal Service"
    assert parsed.from_address == "no-reply@PayPa1-Secure.com"
    assert parsed.from_domain == "paypa1-secure.com"
    assert parsed.reply_to == "collect@elsewhere.example"
    assert parsed.body_text == "Please verify at https://evil.example/login."
    assert parsed.links == (Link("https://evil.example/login", "", "evil.example"),)
    assert parsed.attachments == ()
    assert parsed.recipients == ("alice@corp.example",)
    assert parsed.defects == ()
    assert parsed.truncated_bytes is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.subject = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "display", "address"),
    [
        ("=?utf-8?q?J=C3=B6rg?= <jorg@example.org>", "Jörg", "jorg@example.org"),
        ("plain@example.org", "", "plain@example.org"),
        ('"Bank" <a@bank.example>, b@other.example', "Bank", "a@bank.example"),
        (
            "Microsoft account team ,_<no-reply@ms-secure.example>",
            "Microsoft account team",
            ("no-reply@ms-secure.example"),
        ),
        ("jane at example.org (Jane Doe)", "Jane Doe", "jane@example.org"),  # list archives
        ("undisclosed-recipients:;", "undisclosed-recipients:;", ""),
    ],
)
def test_from_header_variants(value: str, display: str, address: str) -> None:
    parsed = parse_email(message(f"From: {value}", body="x"))
    assert (parsed.from_display, parsed.from_address) == (display, address)


def test_mbox_from_line_is_skipped() -> None:
    raw = b"From spammer@example.com  Thu Aug 22 16:37:34 2002\n" + message(
        "From: Spammer <spammer@example.com>", "Subject: offer", body="Buy now"
    )
    parsed = parse_email(raw)
    assert parsed.subject == "offer"
    assert parsed.from_address == "spammer@example.com"
    assert parsed.body_text == "Buy now"
    assert not any("unix" in d or "envelope" in d for d in parsed.defects)


def test_header_only_message_has_an_empty_body() -> None:
    parsed = parse_email(b"From: a@example.com\r\nSubject: just headers\r\n")
    assert parsed.subject == "just headers"
    assert parsed.body_text == ""


def test_missing_fields_are_empty_strings() -> None:
    parsed = parse_email(message("X-Note: nothing standard", body="hello"))
    assert (parsed.subject, parsed.from_display, parsed.from_address, parsed.reply_to) == (
        "",
        "",
        "",
        "",
    )
    assert parsed.body_text == "hello"


def test_no_receiving_side_header_is_read() -> None:
    receiving = [
        "Received: from mx.corp.example by relay SECRET1",
        "Authentication-Results: spf=pass SECRET2",
        "ARC-Seal: i=1; SECRET3",
        "X-MS-Exchange-Organization-AuthAs: SECRET4",
        "X-Spam-Status: Yes SECRET5",
        "List-Id: <SECRET6.lists.example>",
        "Date: Mon, 1 Jan 2024 00:00:00 +0000",
        "Message-ID: <SECRET7@example.com>",
        "X-Mailer: SECRET8",
        "X-Folder: SECRET9",
    ]
    parsed = parse_email(message("From: a@example.com", "Subject: s", *receiving, body="b"))
    text = repr(parsed)
    assert not any(f"SECRET{i}" in text for i in range(1, 10))
    assert "2024" not in text


# --- recipients ------------------------------------------------------------------------


def test_recipient_addresses_are_masked_everywhere() -> None:
    raw = message(
        "From: Sender <sender@shop.example>",
        "To: Victim <Victim@Corp.example>",
        "Cc: boss@corp.example",
        "Delivered-To: victim+tag@corp.example",
        "X-Original-To: archive@corp.example",
        "Received: from x by y with ESMTP for <rcpt@envelope.example>; Mon, 1 Jan 2024",
        "Subject: Invoice for VICTIM@corp.example",
        "Content-Type: text/html",
        body=(
            "<p>Dear victim@corp.example, cc boss@corp.example and rcpt@envelope.example.</p>"
            '<a href="https://x.example/track?u=victim%40corp.example">victim@corp.example</a>'
            "<p>archive@corp.example victim+tag@corp.example</p>"
        ),
    )
    parsed = parse_email(raw)
    p = RECIPIENT_PLACEHOLDER
    assert parsed.subject == f"Invoice for {p}"
    assert parsed.body_text == f"Dear {p}, cc {p} and {p}.\n{p}\n{p} {p}"
    assert parsed.links == (Link(f"https://x.example/track?u={p}", p, "x.example"),)
    assert set(parsed.recipients) == {
        "victim@corp.example",
        "boss@corp.example",
        "victim+tag@corp.example",
        "archive@corp.example",
        "rcpt@envelope.example",
    }
    assert "corp.example" not in repr(dataclasses.replace(parsed, recipients=()))


def test_addresses_without_a_dotted_domain_are_masked() -> None:
    # Anonymised corpora write the recipient as e.g. phishing@pot, also where no header says so.
    raw = message(
        '"phishing@pot" <phishing@pot>',
        "To: someone@else.example",
        "Subject: FW: mail for PHISHING@POT",
        body="This message was mailed to phishing@pot. Width: phishing@potpx; keep a@b.example",
    )
    raw = b"From: " + raw
    parsed = parse_email(raw)
    p = RECIPIENT_PLACEHOLDER
    assert parsed.from_display == p
    assert parsed.from_address == p
    assert parsed.from_domain == ""
    assert parsed.subject == f"FW: mail for {p}"
    assert parsed.body_text == f"This message was mailed to {p}. Width: {p}; keep a@b.example"


# --- mailing lists, list archives and anonymised corpora ------------------------------
# What a list or an archive adds must not tell the model which list (or corpus) carried a
# message; what the sender wrote, unsubscribe text of newsletters and phishing included,
# stays.

RULE = "_" * 47  # mailman's
LIST_HEADERS = (
    "List-Id: Some list for testing <some-list.lists.example.org>",
    "List-Post: <mailto:some-list@lists.example.org>",
    "X-BeenThere: some-list@lists.example.org",
)
MAILMAN_FOOTER = (
    f"{RULE}\nSome-list mailing list\nsome-list@lists.example.org\n"
    "https://lists.example.org/mailman/listinfo/some-list"
)


def list_message(*headers: str, body: str, subject: str = "Help with drivers") -> bytes:
    return message(
        'From: "Jane Roe" <jane@home.example>',
        "To: some-list@lists.example.org",
        f"Subject: {subject}",
        *LIST_HEADERS,
        *headers,
        body=body,
    )


def test_mailman_footer_and_its_quoted_copies_are_taken_out() -> None:
    quoted = "\n".join("> " + line for line in MAILMAN_FOOTER.split("\n"))
    body = (
        "Which driver do you use? See https://docs.example.net/drivers\n\n"
        f"On Monday Bob wrote:\n> It fails.\n>\n{quoted}\n\nJane\n\n{MAILMAN_FOOTER}\n"
    )
    parsed = parse_email(list_message(body=body))
    assert parsed.body_text == (
        "Which driver do you use? See https://docs.example.net/drivers\n\n"
        "On Monday Bob wrote:\n> It fails.\n>\n\nJane"
    )
    assert [link.url for link in parsed.links] == ["https://docs.example.net/drivers"]


def test_mailman_footer_is_taken_out_without_list_headers() -> None:
    # List archives keep the footer but not the headers.
    body = f"Thanks!\n\n{RULE}\nR-help at r-project.example mailing list -- To UNSUBSCRIBE\n"
    body += "https://stat.example.org/mailman/listinfo/r-help\nPLEASE do read the guide\n"
    parsed = parse_email(message("From: a@b.example", "Subject: [R-help] plots", body=body))
    assert parsed.body_text == "Thanks!"
    assert parsed.links == ()
    assert parsed.subject == "plots"  # the tag names the list the footer named


def test_an_advertisement_glued_to_the_footer_goes_with_it() -> None:
    ad = "-" * 55 + "\nThis list is sponsored by: Geeks\nhttp://ads.example.com/geek\n"
    parsed = parse_email(list_message(body=f"My answer.\n\n{ad}{MAILMAN_FOOTER}"))
    assert parsed.body_text == "My answer."
    assert parsed.links == ()


@pytest.mark.parametrize(
    "footer",
    [
        # a `--` line, then the list's pages
        "--\nSome list: some-list@lists.example.org\n"
        "http://www.lists.example.org/mailman/listinfo/some for (un)subscription information.",
        # a group's footer: an unsubscribe address of the list manager
        "-- \nYou received this message because you are subscribed to the group.\n"
        "To unsubscribe, send an email to some-group+unsubscribe@groups.example.com.",
        # a rule, then the group's links
        "-=-=-=-=-=-=-=-=-=-=-=-\nGroups Links: You receive all messages sent to this group.\n"
        "Group Owner: some-group+owner@groups.example.com",
    ],
)
def test_other_list_footers_after_a_separator_are_taken_out(footer: str) -> None:
    parsed = parse_email(message("From: a@b.example", body=f"Works for me.\n\n{footer}\n"))
    assert parsed.body_text == "Works for me."


def test_the_trailer_of_a_discussion_list_is_taken_out() -> None:
    trailer = (
        f"{'-' * 24} Groups Sponsor {'-' * 24}~-->\nFree DVDs\nhttp://ads.example.com/dvd\n"
        f"{'-' * 64}~->\n\nTo unsubscribe from this group, send an email to:\n"
        "some-list-unsubscribe@groups.example\n\n"
        "Your use of Groups is subject to http://groups.example/terms/\n"
    )
    body = f"Seen it, it is a fake.\n\n{trailer}"
    assert parse_email(list_message(body=body)).body_text == "Seen it, it is a fake."
    # Without a discussion list's headers (a List-Id alone is not one), nothing is cut.
    plain = message("From: a@b.example", "List-Id: <news.shop.example>", body=body)
    assert parse_email(plain).body_text == body.strip()


@pytest.mark.parametrize(
    "footer",
    [
        f"{RULE}\nYou received this newsletter because you signed up at shop.example.\n"
        "Unsubscribe: https://shop.example/unsubscribe?u=123",
        f"{RULE}\nTo stop receiving these emails, unsubscribe here: https://evil.example/u",
        f"{RULE}\nTo change your mailing list options go to www.shop.example/prefs",
        "--\nSecurity Team\nunsubscribe: https://secure-login.example/unsub",
    ],
)
def test_newsletter_and_phishing_unsubscribe_text_stays(footer: str) -> None:
    body = f"Your account is on hold. Verify now.\n\n{footer}"
    for headers in ([], list(LIST_HEADERS)):
        parsed = parse_email(message("From: a@b.example", *headers, body=body))
        assert parsed.body_text == body


def test_html_footer_links_go_with_the_footer() -> None:
    html = (
        '<p>See <a href="https://docs.example.net/x">the docs</a>.</p><p>'
        + "<br>".join(MAILMAN_FOOTER.split("\n")[:-1])
        + '<br><a href="https://lists.example.org/mailman/listinfo/some-list">'
        "https://lists.example.org/mailman/listinfo/some-list</a></p>"
    )
    parsed = parse_email(list_message("Content-Type: text/html", body=html))
    assert parsed.body_text == "See the docs."
    assert [link.url for link in parsed.links] == ["https://docs.example.net/x"]


def test_archive_and_content_filter_notes_are_taken_out() -> None:
    body = (
        "Use tapply().\n\n\t[[alternative HTML version deleted]]\n\n"
        "-------------- next part --------------\n"
        "A non-text attachment was scrubbed...\nName: plot.png\nType: image/png\n"
        "URL: <https://stat.example.org/pipermail/r-help/attachments/1/plot.png>\n"
    )
    parsed = parse_email(message("From: a@b.example", body=body))
    assert parsed.body_text == "Use tapply()."
    assert parsed.links == ()
    assert ARCHIVE_SCRUBBED in parsed.defects


@pytest.mark.parametrize(
    ("headers", "subject", "expected"),
    [
        # the tag names the message's list (List-Id, List-Post, X-BeenThere...)
        (LIST_HEADERS, "Re: [Some-list] Help", "Re: Help"),
        (LIST_HEADERS, "AW: [SOME_LIST] Hilfe", "AW: Hilfe"),
        ((LIST_HEADERS[0],), "[some-list] Help", "Help"),
        # a one-word tag in mail from a discussion list
        (LIST_HEADERS, "[SLtalk] Help", "Help"),
        # a longer tag that does not name the list stays
        (LIST_HEADERS, "[Weekly News Digest] Help", "[Weekly News Digest] Help"),
        # a List-Id alone (marketing senders add one) is no discussion list
        (("List-Id: <a8f7.xt.local>",), "[FNAME], confirm receipt", "[FNAME], confirm receipt"),
        # no list at all: the sender's own tags are phishing signals
        ((), "[URGENT] Verify your wallet", "[URGENT] Verify your wallet"),
        ((), "Re: [Binance] Withdraw Successful", "Re: [Binance] Withdraw Successful"),
        ((), "[Some-list] Help", "[Some-list] Help"),
        # a tag with no subject after it stays
        (LIST_HEADERS, "[Spam]", "[Spam]"),
        # a list archive's copy: its one-word tags are the list's
        (("From: jane at home.example (Jane Roe)",), "[R] plots", "plots"),
        (("From: jane at home.example (Jane Roe)",), "[URGENT NOTICE] x", "[URGENT NOTICE] x"),
    ],
)
def test_list_subject_tags(headers: Sequence[str], subject: str, expected: str) -> None:
    if not any(h.startswith("From:") for h in headers):
        headers = ("From: a@b.example", *headers)
    assert parse_email(message(*headers, f"Subject: {subject}", body="x")).subject == expected


@pytest.mark.parametrize(
    ("display", "reply_to", "expected"),
    [
        # mailman and Google Groups move the author's address to Reply-To
        ("Jane Roe via Some-list", "jane@home.example", ("Jane Roe", "jane@home.example")),
        ("'Jane Roe' via Some Group", "jane@home.example", ("Jane Roe", "jane@home.example")),
        ("Jane Roe via Some-list", "", ("Jane Roe", LIST_PLACEHOLDER)),
        # a list that keeps no author: its own description is no person's name
        ("Some list for testing", "some-list@lists.example.org", ("", LIST_PLACEHOLDER)),
    ],
)
def test_from_rewritten_by_a_list_reads_as_the_author(
    display: str, reply_to: str, expected: tuple[str, str]
) -> None:
    raw = message(
        f'From: "{display}" <some-list@lists.example.org>',
        *([f"Reply-To: {reply_to}"] if reply_to else []),
        "To: some-list@lists.example.org",
        "Subject: x",
        *LIST_HEADERS,
        body="Ask some-list-owner@lists.example.org or some-list@lists.example.org.\n\nJane",
    )
    parsed = parse_email(raw)
    assert (parsed.from_display, parsed.from_address) == expected
    assert parsed.from_domain == ("home.example" if reply_to.startswith("jane") else "")
    assert parsed.reply_to == (reply_to if reply_to.startswith("jane") else "")
    assert parsed.body_text == (
        f"Ask some-list-owner@lists.example.org or {LIST_PLACEHOLDER}.\n\nJane"
    )


def test_a_reply_to_naming_the_list_is_dropped() -> None:
    raw = list_message("Reply-To: Some-list <some-list@lists.example.org>", body="x")
    parsed = parse_email(raw)
    assert (parsed.from_address, parsed.reply_to) == ("jane@home.example", "")


def test_forged_list_fields_hide_no_address() -> None:
    # Only an address the message was sent to (masked anyway) can read as the list's.
    raw = message(
        'From: "PayPal via Service" <service@paypa1.example>',
        "Reply-To: service@paypa1.example",
        "To: victim@corp.example",
        "List-Post: <mailto:service@paypa1.example>",
        "X-BeenThere: service@paypa1.example",
        "Subject: Verify",
        body="Write to service@paypa1.example",
    )
    parsed = parse_email(raw)
    assert (parsed.from_display, parsed.from_address) == (
        "PayPal via Service",
        "service@paypa1.example",
    )
    assert parsed.reply_to == "service@paypa1.example"
    assert parsed.body_text == "Write to service@paypa1.example"


def test_a_from_spoofing_the_recipient_stays_distinct_from_a_list() -> None:
    raw = message(
        '"IT Support via Helpdesk" <victim@corp.example>',
        "To: victim@corp.example",
        "Subject: Mailbox full",
        body="x",
    )
    parsed = parse_email(b"From: " + raw)
    assert parsed.from_display == "IT Support via Helpdesk"
    assert parsed.from_address == RECIPIENT_PLACEHOLDER != LIST_PLACEHOLDER


@pytest.mark.parametrize(
    ("value", "display", "address"),
    [
        ("jane.roe at home.example (Jane Roe)", "Jane Roe", "jane.roe@home.example"),
        ('"jane at mail.home.example (Jane Roe)"', "Jane Roe", "jane@mail.home.example"),
        ("jane at home.example", "", "jane@home.example"),
        ("jane at home.example (jane at home.example)", "", "jane@home.example"),
        ("jr at home.example (Jane Roe (Home))", "Jane Roe (Home)", "jr@home.example"),
        # an archive that made the address unreadable: only the name is left
        ("j@ne@roe @end|ng |rom home@ex@mple (Jane Roe)", "Jane Roe", ""),
        # no archive writes an address without a domain
        ("Support at PayPal (Security)", "Support at PayPal (Security)", ""),
    ],
)
def test_list_archive_senders_are_read_back(value: str, display: str, address: str) -> None:
    parsed = parse_email(message(f"From: {value}", "Subject: x", body="x"))
    assert (parsed.from_display, parsed.from_address) == (display, address)


def test_list_archive_bodies_have_their_addresses_read_back() -> None:
    body = (
        "Bob Smith <bob.smith at uni.example> writes:\n> j@ne @end|ng |rom home@ex@mple asked\n"
        "Mail me at jane at home.example, or look at docs.example.org."
    )
    parsed = parse_email(message("From: jane at home.example (Jane Roe)", body=body))
    assert parsed.body_text == (
        "Bob Smith <bob.smith@uni.example> writes:\n> asked\n"
        "Mail me at jane@home.example, or look@docs.example.org."
    )
    # Only in an archive's copy: elsewhere "look at example.org" is just text.
    plain = parse_email(message("From: a@b.example", body="look at docs.example.org"))
    assert plain.body_text == "look at docs.example.org"


def test_addresses_in_anonymised_domains_are_masked() -> None:
    raw = message(
        'From: "Feeds" <rssfeeds@spamassassin.taint.org>',
        "To: yyyy@spamassassin.taint.org",
        "Subject: news for yyyy@spamassassin.taint.org",
        body="Sent by jm@relay.spamassassin.taint.org to jm@taint.example, bob@example.com",
    )
    parsed = parse_email(raw)
    p = RECIPIENT_PLACEHOLDER
    # A sender the corpus anonymised is not the recipient: no fake self-spoofing From.
    assert (parsed.from_display, parsed.from_address, parsed.from_domain) == ("Feeds", "", "")
    assert parsed.subject == f"news for {p}"
    assert parsed.body_text == f"Sent by {p} to jm@taint.example, bob@example.com"
    # The recipient's own address as From is still the recipient.
    own = raw.replace(b"rssfeeds@", b"yyyy@")
    assert parse_email(own).from_address == p


@pytest.mark.parametrize(
    "body",
    [
        ("_" * 40 + "\n") * 50_000,
        ("_" * 40 + "\nx mailing list\n") * 30_000,
        ("--\n" + "y\n" * 11) * 40_000,
        "a" * 1_000_000 + " at " + "b." * 100_000,
        "x" * 500_000 + " @end|ng |rom " + "y" * 500_000,
        ("> " * 1000 + "_" * 40 + "\n") * 500,
    ],
)
def test_list_patterns_stay_linear_on_hostile_bodies(body: str) -> None:
    raw = message("From: a at b.example (A)", *LIST_HEADERS, "Subject: [x] y", body=body)
    _, elapsed = timed_parse(raw)
    assert elapsed < TIME_LIMIT_S


# --- charsets and transfer encodings ---------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        ("iso-8859-1", "Café crème à la française"),
        ("koi8-r", "Привет, мир"),
        ("shift_jis", "こんにちは世界"),
        ("gb2312", "你好，世界"),
        ("utf-8", "Grüße 👋 naïve"),
    ],
)
@pytest.mark.parametrize("encoding", ["8bit", "base64", "quoted-printable"])
def test_body_charsets_and_transfer_encodings(charset: str, text: str, encoding: str) -> None:
    data = text.encode(charset)
    if encoding == "base64":
        data = base64.encodebytes(data)
    elif encoding == "quoted-printable":
        data = quopri.encodestring(data)
    raw = message(
        "From: a@example.com",
        f'Content-Type: text/plain; charset="{charset}"',
        f"Content-Transfer-Encoding: {encoding}",
        body=data,
    )
    parsed = parse_email(raw)
    assert parsed.body_text == text
    assert parsed.defects == ()


def test_quoted_printable_artefacts_are_gone() -> None:
    body = b'Click <a href=3D"https://bank.example/x">here</a> to con=\nfirm=20\n'
    raw = message(
        "From: a@example.com",
        "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable",
        body=body,
    )
    parsed = parse_email(raw)
    assert parsed.body_text == "Click here to confirm"
    assert parsed.links == (Link("https://bank.example/x", "here", "bank.example"),)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("=?UTF-8?B?w4lsw6hudSDwn5Sl?=", "Élènu 🔥"),
        ("=?iso-8859-1?q?Caf=E9_cr=E8me?=", "Café crème"),
        ("=?koi8-r?B?8NLJ18XU?=", "Привет"),
        ("=?utf-8?q?split_wo?= =?utf-8?q?rd?=", "split word"),
        ("=?x-bogus?q?plain_text?=", "plain text"),
    ],
)
def test_encoded_word_subjects(header: str, expected: str) -> None:
    assert parse_email(message("From: a@example.com", f"Subject: {header}")).subject == expected


def test_bogus_charset_falls_back_to_utf8_then_windows_1252() -> None:
    def body_of(data: bytes) -> ParsedEmail:
        return parse_email(
            message("From: a@example.com", "Content-Type: text/plain; charset=x-no-such", body=data)
        )

    as_utf8 = body_of("naïve café".encode())
    assert as_utf8.body_text == "naïve café"
    assert as_utf8.defects == ("unknown charset 'x-no-such'",)
    assert body_of("naïve café".encode("latin-1")).body_text == "naïve café"
    # A codec name that is not a text encoding is unknown as a charset too.
    rot = parse_email(
        message("From: a@b.example", "Content-Type: text/plain; charset=base64", body=b"hi")
    )
    assert rot.body_text == "hi"


def test_wrong_declared_charset_and_undecodable_bytes_do_not_raise() -> None:
    raw = message(
        "From: a@example.com",
        "Content-Type: text/plain; charset=utf-8",
        body=b"valid \xc3\xa9 then junk \xff\xfe\x80 end",
    )
    assert parse_email(raw).body_text == "valid é then junk \ufffd\ufffd\ufffd end"


def test_decode_text_contract() -> None:
    assert decode_text("é".encode(), None) == ("é", None)
    assert decode_text(b"\xe9", "us-ascii") == ("é", None)  # not UTF-8: windows-1252
    assert decode_text(b"\x93q\x94", "iso-8859-1") == ("“q”", None)  # latin-1 read as cp1252
    assert decode_text(b"x", "\x00bad") == ("x", "unknown charset '\\x00bad'")


def test_raw_8bit_headers_are_decoded() -> None:
    raw = (
        "Subject: Olá, promoção ✓\n".encode()
        + b'From: "J\xf6rg M\xfcller" <jm@example.com>\n\nbody'  # latin-1, undeclared
    )
    parsed = parse_email(raw)
    assert parsed.subject == "Olá, promoção ✓"
    assert parsed.from_display == "Jörg Müller"
    assert parsed.from_address == "jm@example.com"


@pytest.mark.parametrize(
    "value",
    [
        "a@",  # IndexError inside policy.default (Python 3.11)
        "(" * 3000,  # RecursionError inside policy.default
        "@purd|e@@ @end|ng |rom gm@||@com (Jane)",
        '"a" ' * 5000,  # quadratic in policy.default when not cut
        "=?utf-8?q?" + "a" * 5000,
    ],
)
def test_headers_that_break_policy_default(value: str) -> None:
    raw = message(f"From: {value}", f"Reply-To: {value}", f"Subject: {value}", body="kept")
    parsed, elapsed = timed_parse(raw)
    assert parsed.body_text == "kept"
    assert elapsed < TIME_LIMIT_S


def test_hostile_content_type_parameters_are_bounded() -> None:
    hostile = "text/html" + " ;" * 20_000 + "; a=b" * 2000 + '; c="' + ";" * 5000
    parts = [part(f"Content-Type: {hostile}", body=f"<p>part {i}</p>") for i in range(150)]
    parsed, elapsed = timed_parse(multipart("mixed", *parts, headers=["From: a@b.example"]))
    assert parsed.body_text.startswith("part 0\n\npart 1")
    assert elapsed < TIME_LIMIT_S


# --- MIME structure --------------------------------------------------------------------


def test_alternative_prefers_plain_but_keeps_html_links() -> None:
    raw = multipart(
        "alternative",
        part("Content-Type: text/plain", body="Plain version, see the site."),
        part(
            "Content-Type: text/html",
            body='<p>HTML version <a href="https://site.example/a">the site</a></p>',
        ),
        headers=["From: a@example.com"],
    )
    parsed = parse_email(raw)
    assert parsed.body_text == "Plain version, see the site."
    assert parsed.links == (Link("https://site.example/a", "the site", "site.example"),)


def test_alternative_with_blank_plain_uses_html() -> None:
    raw = multipart(
        "alternative",
        part("Content-Type: text/plain", body="  \n \n"),
        multipart(
            "related",
            part("Content-Type: text/html", body="<p>Rich <b>text</b></p>"),
            part(
                "Content-Type: image/png",
                "Content-ID: <logo>",
                "Content-Transfer-Encoding: base64",
                body="iVBORw0KGgo=",
            ),
            boundary="inner",
        ),
        headers=["From: a@example.com"],
    )
    parsed = parse_email(raw)
    assert parsed.body_text == "Rich text"
    assert parsed.attachments == (Attachment("", "image/png", 8),)


def test_html_declared_as_plain_text_is_converted() -> None:
    raw = message("From: a@b.example", body="<html><body><p>Hi <b>there</b></p></body></html>")
    assert parse_email(raw).body_text == "Hi there"


def test_attachments_names_types_and_sizes() -> None:
    payload = os.urandom(12_345)
    raw = multipart(
        "mixed",
        part("Content-Type: text/plain", body="see attached"),
        part(
            'Content-Type: application/octet-stream; name="=?utf-8?b?ZmFjdHVyYS5wZGYuZXhl?="',
            "Content-Disposition: attachment",
            "Content-Transfer-Encoding: base64",
            body=base64.encodebytes(payload),
        ),
        part(
            "Content-Type: application/pdf",
            "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf",
            body="%PDF-1.4",
        ),
        part(
            'Content-Type: text/plain; name="notes.txt"',
            'Content-Disposition: attachment; filename="notes.txt"',
            body="not body text",
        ),
        headers=["From: a@example.com"],
    )
    parsed = parse_email(raw)
    assert parsed.body_text == "see attached"
    assert parsed.attachments == (
        Attachment("factura.pdf.exe", "application/octet-stream", 12_345),
        Attachment("résumé.pdf", "application/pdf", 8),
        Attachment("notes.txt", "text/plain", 13),
    )


def test_attached_message_is_read_and_its_recipients_masked() -> None:
    inner = message(
        "From: Bank <alerts@bank-secure.example>",
        "To: original@victim.example",
        "Subject: Verify your account",
        body="Dear original@victim.example, verify at https://bank-secure.example/v",
    )
    raw = multipart(
        "mixed",
        part("Content-Type: text/plain", body="FYI, phishing below"),
        part("Content-Type: message/rfc822", body=inner),
        headers=["From: forwarder@corp.example", "Subject: Fwd: Verify your account"],
    )
    parsed = parse_email(raw)
    assert parsed.body_text == (
        "FYI, phishing below\n\n[Attached message]\nFrom: Bank <alerts@bank-secure.example>\n"
        f"Subject: Verify your account\n\nDear {RECIPIENT_PLACEHOLDER}, verify at "
        "https://bank-secure.example/v"
    )
    assert "original@victim.example" in parsed.recipients


def test_many_attached_messages_with_hostile_headers_are_bounded() -> None:
    hostile = message(
        "From: " + '"a" ' * 400,
        "Subject: " + "=?utf-8?q?a?= " * 200,
        "Content-Type: text/plain",
        body="inner text",
    )
    parts = [part("Content-Type: message/rfc822", body=hostile) for _ in range(90)]
    parsed, elapsed = timed_parse(multipart("mixed", *parts, headers=["From: a@b.example"]))
    assert parsed.body_text.count("[Attached message]") == 10
    assert parsed.body_text.count("inner text") == 90
    assert elapsed < TIME_LIMIT_S


def test_missing_boundary_parameter_keeps_the_text() -> None:
    raw = message(
        "From: a@example.com", "Content-Type: multipart/mixed", body="just text after all"
    )
    parsed = parse_email(raw)
    assert parsed.body_text == "just text after all"
    assert "no boundary in multipart" in parsed.defects


def test_boundary_never_used_keeps_the_text() -> None:
    raw = message(
        "From: a@example.com",
        'Content-Type: multipart/mixed; boundary="nowhere"',
        body="--elsewhere\nContent-Type: text/plain\n\ntext under a wrong boundary\n",
    )
    parsed = parse_email(raw)
    assert "text under a wrong boundary" in parsed.body_text
    assert "start boundary not found" in parsed.defects


def test_missing_close_boundary_keeps_the_parts() -> None:
    raw = message(
        "From: a@example.com",
        'Content-Type: multipart/mixed; boundary="b"',
        body="--b\nContent-Type: text/plain\n\nfirst\n--b\nContent-Type: text/plain\n\nsecond\n",
    )
    parsed = parse_email(raw)
    assert parsed.body_text == "first\n\nsecond"
    assert "close boundary not found" in parsed.defects


def test_deep_nesting_stops_at_max_depth() -> None:
    levels = 5000
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(levels)
    )
    raw = (
        b"From: a@example.com\nContent-Type: multipart/mixed; boundary=top\n\n--top\n"
        b"Content-Type: text/plain\n\nTOP TEXT\n--top\n" + head + b"Content-Type: text/plain\n\n"
        b"DEEP TEXT\n" + b"".join(b"--b%d--\n" % i for i in reversed(range(levels))) + b"--top--\n"
    )
    parsed, elapsed = timed_parse(raw)
    assert parsed.body_text == "TOP TEXT"
    assert "MIME parts nested deeper than 20 levels; the rest was not read" in parsed.defects
    assert elapsed < TIME_LIMIT_S


def test_nesting_up_to_max_depth_is_read() -> None:
    inner = part("Content-Type: text/plain", body="DEEP TEXT")
    for level in range(19):  # the root is level 0; the text ends up at level 20
        inner = multipart("mixed", inner, boundary=f"b{level}")
    parsed = parse_email(multipart("mixed", inner, headers=["From: a@b.example"]))
    assert parsed.body_text == "DEEP TEXT"
    assert not any("nested" in d for d in parsed.defects)
    shallow = parse_email(multipart("mixed", inner, headers=["From: a@b.example"]), max_depth=5)
    assert shallow.body_text == ""


def test_thousands_of_parts_stop_at_max_parts() -> None:
    parts = [part("Content-Type: text/plain", body=f"part{i}") for i in range(20_000)]
    parsed, elapsed = timed_parse(multipart("mixed", *parts, headers=["From: a@b.example"]))
    assert parsed.body_text.startswith("part0\n\npart1\n\n")
    assert "part198" in parsed.body_text
    assert "part1000" not in parsed.body_text
    assert "more than 200 MIME parts; the rest was not read" in parsed.defects
    assert elapsed < TIME_LIMIT_S


def test_empty_parts_flood_is_bounded() -> None:
    raw = b"From: a@b.example\nContent-Type: multipart/mixed; boundary=X\n\n" + b"--X\n\n" * 500_000
    parsed, elapsed = timed_parse(raw)
    assert parsed.body_text == ""
    assert elapsed < TIME_LIMIT_S


def test_fifty_megabyte_message_reads_only_the_head() -> None:
    attachment = base64.encodebytes(os.urandom(37 * 1024 * 1024))  # ~50 MB encoded
    raw = multipart(
        "mixed",
        part("Content-Type: text/plain", body="Your invoice is attached."),
        part(
            "Content-Type: application/zip",
            'Content-Disposition: attachment; filename="invoice.zip"',
            "Content-Transfer-Encoding: base64",
            body=attachment,
        ),
        headers=["From: billing@vendor.example", "Subject: Invoice"],
    )
    assert len(raw) > 50_000_000
    parsed, elapsed = timed_parse(raw)
    assert parsed.truncated_bytes is True
    assert parsed.subject == "Invoice"
    assert parsed.body_text == "Your invoice is attached."
    (zip_part,) = parsed.attachments
    assert zip_part.filename == "invoice.zip"
    assert 2_500_000 < zip_part.size <= 3 * 1024 * 1024
    cut = raw.rfind(b"\n", 0, 4 * 1024 * 1024) + 1
    assert parsed.defects[0] == f"only the first {cut} of {len(raw)} bytes were read"
    assert elapsed < TIME_LIMIT_S


def test_cut_happens_at_a_line_break() -> None:
    raw = message("From: a@b.example", body="word " * 100 + "\n" + "tail " * 100)
    parsed = parse_email(raw, max_bytes=len(raw) - 10)
    assert parsed.truncated_bytes
    assert parsed.body_text == ("word " * 100).strip()


@pytest.mark.parametrize("line", [b"\n", b"\r", b"--x\n"])
def test_millions_of_short_lines_are_bounded(line: bytes) -> None:
    nested = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(20)
    )
    raw = (
        b"From: a@b.example\n" + nested + b"Content-Type: text/plain\n\nstart\n" + line * 4_000_000
    )
    parsed, elapsed = timed_parse(raw)
    assert parsed.body_text.startswith("start")
    assert elapsed < TIME_LIMIT_S


# --- invalid input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"\r\n\r\n\t \n", b"From someone@example.com  Mon Jan  1 00:00:00 2024\n\n"],
)
def test_empty_messages(raw: bytes) -> None:
    with pytest.raises(InvalidMessage, match=r"^empty message$"):
        parse_email(raw)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(2000), "binary data"),
        (b"PK\x03\x04\x14\x00\x08\x00" + zlib.compress(os.urandom(2000)), "binary data"),
        (b"\x00" * 100_000, "binary data"),
        (b"hello world\nthis is not an email\n", "text"),
    ],
)
def test_non_email_input(raw: bytes, kind: str) -> None:
    with pytest.raises(InvalidMessage, match=f"^not an RFC 822 message: {kind} without header"):
        parse_email(raw)


def test_invalid_limits_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        parse_email(b"From: a@b.example\n\nx", max_depth=1000)


# --- HTML ------------------------------------------------------------------------------


def test_html_text_drops_script_style_head_and_hidden_text() -> None:
    html = (
        "<html><head><title>Title</title><style>p {color: red}</style></head><body>"
        "<script>var hidden = 1;</script><div>Hello&nbsp;&amp; welcome&#33;</div>"
        '<div style="display:none">PREHEADER</div><span style="font-size:0px">zero</span>'
        '<p hidden>gone</p><p style="visibility: hidden">gone too</p>'
        '<table><tr><td>a</td><td>b</td></tr></table><img src="x.png" alt="Logo">'
        "<!-- <p>commented out</p> --><p>x &lt; y</p></body></html>"
    )
    converted = html_to_text(html)
    assert converted.text == "Hello & welcome!\n\na b\n\nLogo\nx < y"
    assert converted.anchors == ()


def test_html_anchors_keep_their_visible_text() -> None:
    html = (
        '<a href="https://evil.example/login">Visit <b>www.paypal.com</b></a>'
        '<a href="  https://x.example/\n  path ">  spaced   text </a>'
        '<a href="mailto:help@x.example"><img alt="Help"></a>'
        '<a href="https://hidden.example" style="display:none">hidden</a>'
        '<map><area href="https://area.example" alt="Area"></map><a href="#top">top</a>'
    )
    converted = html_to_text(html)
    assert [(a.href, a.text) for a in converted.anchors] == [
        ("https://evil.example/login", "Visit www.paypal.com"),
        ("https://x.example/\n  path", "spaced text"),
        ("mailto:help@x.example", "Help"),
        ("https://area.example", "Area"),
        ("#top", "top"),
    ]
    parsed = parse_email(message("From: a@b.example", "Content-Type: text/html", body=html))
    assert [(link.url, link.text, link.domain) for link in parsed.links] == [
        ("https://evil.example/login", "Visit www.paypal.com", "evil.example"),
        ("https://x.example/path", "spaced text", "x.example"),
        ("mailto:help@x.example", "Help", "x.example"),
        ("https://area.example", "Area", "area.example"),
    ]


def test_unclosed_head_ends_at_body_content() -> None:
    assert html_to_text("<html><head><meta charset=utf-8><div>visible</div>").text == "visible"


@pytest.mark.parametrize(
    "html",
    [
        "<a " * 40_000,  # quadratic in Python 3.11's HTMLParser
        "</" * 40_000,
        "<![" * 40_000,
        "<![foo bar]> text",  # AssertionError in html.parser
        "<a title='>" * 40_000,
        "<div>" * 40_000,
        '<a href="x">' * 40_000,
        "<!--" + "x" * 100_000,
        "&#" * 40_000 + "&#99999999999;",
        "<svg><foreignObject><p>deep" * 5000,
    ],
)
def test_malformed_html_never_raises_and_stays_linear(html: str) -> None:
    start = time.perf_counter()
    converted = html_to_text(html)
    assert time.perf_counter() - start < TIME_LIMIT_S
    assert isinstance(converted.text, str)


def test_links_are_deduplicated_and_bounded() -> None:
    urls = " ".join(f"https://site{i}.example/p?q={i}." for i in range(MAX_LINKS + 50))
    body = f"{urls} https://site0.example/p?q=0 (see www.site1.example/p?q=1)"
    parsed = parse_email(message("From: a@b.example", body=body))
    assert len(parsed.links) == MAX_LINKS
    assert parsed.links[0] == Link("https://site0.example/p?q=0", "", "site0.example")
    assert len({link.url for link in parsed.links}) == MAX_LINKS


def test_invisible_characters_and_whitespace_are_normalised() -> None:
    body = "Pa\u200bss\u00adword  \t re\u034fset\r\n\r\n\r\n\r\n\u202eexe.pdf\x00\x07 done  \n"
    parsed = parse_email(message("From: a@b.example", "Subject: a\u200b b\t\tc", body=body))
    assert parsed.subject == "a b c"
    assert parsed.body_text == "Password reset\n\nexe.pdf done"


# --- properties ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_parse_or_raise_invalid_message(raw: bytes) -> None:
    try:
        parsed = parse_email(raw)
    except InvalidMessage as error:
        assert str(error)
    else:
        assert isinstance(parsed.body_text, str)


_FIELDS = st.sampled_from(
    [
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Disposition",
        "Received",
        "X-Spam-Status",
        "MIME-Version",
        "List-Id",
        "List-Post",
        "X-BeenThere",
    ]
)
_VALUES = st.one_of(
    st.text(max_size=80).map(lambda s: s.replace("\n", " ").replace("\r", " ")),
    st.sampled_from(
        [
            "multipart/mixed; boundary=B",
            "multipart/alternative; boundary=B",
            "multipart/mixed",
            "message/rfc822",
            "text/html; charset=x-bogus",
            "text/plain; charset=utf-16",
            "base64",
            "quoted-printable",
            "a@",
            "=?utf-8?b?////?=",
            "=?bogus?q?=ZZ?=",
            "attachment; filename*=bogus''%FF",
            "<a@b.example>, (((",
            "<mailto:l@lists.example>",
            "List <l.lists.example>",
            "a at b.example (A)",
            "x@ @end|ng |rom y (A)",
            "[l] subject",
        ]
    ),
)
_BODIES = st.lists(
    st.one_of(
        st.text(max_size=200),
        st.sampled_from(
            [
                *("--B", "--B--", "\n", "<html><a href='http://x'>", "=\n", "=3D", "--"),
                *("_" * 40, "l mailing list", "http://l.example/mailman/listinfo/l"),
                *("l-request@l.example", "> ", "[[alternative HTML version deleted]]"),
            ]
        ),
    ),
    max_size=12,
).map("\n".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.lists(st.tuples(_FIELDS, _VALUES), max_size=10),
    body=_BODIES,
    encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
)
def test_arbitrary_compositions_parse_or_raise_invalid_message(
    headers: list[tuple[str, str]], body: str, encoding: str
) -> None:
    raw = (
        "".join(f"{name}: {value}\n" for name, value in headers).encode(encoding, errors="replace")
        + b"\n"
        + body.encode(encoding, errors="replace")
    )
    try:
        parsed = parse_email(raw)
    except InvalidMessage as error:
        assert str(error)
    else:
        assert "\x00" not in parsed.body_text
        assert len(parsed.links) <= MAX_LINKS
