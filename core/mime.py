"""Parse a raw RFC 822 message into what its sender wrote (DESIGN invariants 1, 2 and 7).

`parse_email` reads an allow-list of sender-side content: From, Reply-To, Subject and the
MIME body (text, links, attachment names). Nothing a receiving server or a corpus added
(Received, Authentication-Results, ARC-*, X-MS-Exchange-*, X-Spam-*, List-*, Date,
Message-ID, X-Mailer, To/Cc...) reaches the result, except that the recipients' addresses
are collected so that they can be masked wherever they appear.

What a mailing list or a list archive added to the sender's message is taken away too, so
that the model sees a person's post the same way whichever list (or corpus) carried it:

- the list's footer (mailman's `____` rule followed by a "Some-list mailing list" /
  listinfo block, a `--` or other rule followed by a list manager's page or address, an
  advertisement glued above it), wherever it is, quoted copies included; the trailer of
  a discussion list's message; archive and content-filter notes (`[[alternative HTML
  version deleted]]`, pipermail's "was scrubbed" blocks);
- a list's address (named by List-Post, X-BeenThere, Mailing-List or List-Id) that the
  message was sent to reads LIST_PLACEHOLDER rather than RECIPIENT_PLACEHOLDER (only
  addresses masked anyway are told apart: list fields can be forged); a Reply-To naming
  that list is the list's setting and is dropped; a From rewritten to that list ("Jane
  via Some-list" <list>) reads as the author: the person's name and the address the list
  moved to Reply-To (LIST_PLACEHOLDER where the list kept none; a list's description
  used as the From name is no person's and is dropped);
- a leading `[tag]` in the Subject (after Re:/Fwd:) when the message shows it came from a
  list: the tag names that list (by its headers or footer), or the message has list
  headers and the tag is one word, or it is an archive copy and the tag is one short
  word. Other bracket tags (`[URGENT]`, `[Binance]`) are the sender's and stay;
- a list archive's obfuscated addresses (`jane at example.org (Jane Doe)`) are read back
  where they can be; addresses the archive made unreadable are dropped;
- addresses in domains that public corpora substituted for their recipients' own
  (ANONYMISED_DOMAINS) are masked like the recipient's (a From that is not one of the
  recipients loses its address instead).

Every limit is enforced while parsing, so time and memory stay bounded for any input. Bad
input yields what could be recovered (with `defects` saying what was wrong) or raises
InvalidMessage; nothing else escapes.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.feedparser import BytesFeedParser
from email.message import EmailMessage, Message
from email.policy import EmailPolicy
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from phishgate.core.errors import InvalidMessage
from phishgate.core.html_text import Anchor, html_to_text

RECIPIENT_PLACEHOLDER = "<recipient>"
"""Stands in for the recipient's own addresses (and any address without a dotted domain,
which no Internet sender has: anonymisation placeholders such as `phishing@pot`)."""
LIST_PLACEHOLDER = "<mailing-list>"
"""Stands in for a mailing list's own addresses: the list that relayed a message is
neither its author nor its recipient."""
ANONYMISED_DOMAINS = ("spamassassin.taint.org",)
"""Domains that public corpora wrote in place of their recipients' own: addresses there
are masked like the recipient's, except a From that is not one of the recipients, whose
address is dropped (the corpus made it unreadable; it is not the recipient's own)."""
ARCHIVE_SCRUBBED = "a list archive removed parts of the message (scrubbed)"
"""The defect noted when a list archive's copy lacks parts of the message: its body may
be all that is left of it, or nothing."""
MAX_LINKS = 100
MAX_ATTACHMENTS = 100
MAX_DEFECTS = 20
MAX_BODY_CHARS = 1_000_000
"""Body text kept in a ParsedEmail; rendering keeps far less."""

_CHUNK = 4096
# Fed in chunks so that the part and depth limits stop the parser soon after they trip.
_MAX_LINE_BREAKS = 100_000
# email.feedparser checks every line against each enclosing boundary: bound lines x depth.
_MAX_HEADER_CHARS = 1024
_MAX_MIME_PARAMS = 16
# Header values are cut to these before parsing: policy.default's parser (and the older
# parameter splitting in email.message) takes quadratic time on long hostile values.
_MAX_ATTACHED_HEADERS = 10  # attached messages whose From and Subject are read
_MAX_RECIPIENT_FIELD_CHARS = 16_384
_MAX_PART_BYTES = 1_000_000
_MAX_HTML_CHARS = 512 * 1024
_MAX_URL_CHARS = 2048
_MAX_RECIPIENTS = 100

_RECIPIENT_FIELDS = frozenset(
    {
        "to",
        "cc",
        "bcc",
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "x-envelope-to",
        "x-forwarded-to",
        "x-forwarded-for",
        "x-rcpt-to",
        "apparently-to",
        "original-recipient",
        "resent-to",
        "resent-cc",
    }
)
_ADDRESS = re.compile(r"[^\s<>(),;:\"'\[\]\\]+@[^\s<>(),;:\"'\[\]\\]+")
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;\"']+@[^\s<>;\"']+?)>?(?=[\s;]|$)", re.IGNORECASE)
# Anything shaped like an address, plain or %-encoded; starts only at a run's first char.
_ADDRESS_TOKEN = re.compile(r"(?<![\w.+%-])[\w.+%-]+(?:@|%40)[\w-]+(?:\.[\w-]+)*", re.IGNORECASE)
_MIME_FIELDS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
_EMPTY_PARAMS = re.compile(r";[\s;]*;")
_NON_SPACE = re.compile(rb"\S")
_MBOX_FROM = re.compile(rb"From (?!\s*:)")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,40})\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"\?=\s+=\?")  # whitespace between encoded words is not text
_BARE_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'`{}|\\^\[\]]+", re.IGNORECASE)
_URL_TRAILER = ".,;:!?)'\"*"
_LINKABLE = ("http://", "https://", "ftp://", "www.", "mailto:")
_HTML_START = re.compile(r"\s*(?:<!doctype\s+html|<html|<head|<body)", re.IGNORECASE)
_WHITESPACE_RUN = re.compile(r"[^\S\n]+")
_ANY_WHITESPACE = re.compile(r"\s+")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
# Zero-width and bidi formatting characters, other invisibles used to split words, and
# control characters: they change nothing a reader sees but fragment the model's tokens.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# Mailing lists: fields that name a list. Those of discussion lists' managers are
# evidence that a message came through one; a List-Id alone is not (marketing senders
# add it, with List-Unsubscribe, RFC 2919 and 8058).
_LIST_FIELDS = frozenset({"list-id", "list-post", "x-beenthere", "mailing-list"})
_DISCUSSION_LIST_FIELDS = frozenset({"list-post", "x-beenthere", "mailing-list"})
_LIST_ID = re.compile(r"<\s*([^<>\s.]+)\.([^<>\s]+\.[^<>\s]+?)\s*>")
_LIST_KEY_JUNK = re.compile(r"[\W_]+")
# A leading [tag] after reply prefixes (Re:, AW:, Fwd[2]:...), followed by the subject.
_SUBJECT_TAG = re.compile(
    r"((?:[^\W\d_]{1,4}(?:\[\d{1,3}\])?[ \t]*:[ \t]*)*)\[([^\[\]]{1,40})\][ \t]*(?=\S)"
)
_LIST_TAG_CHARS = 30  # a one-word tag in mail with list headers
_ARCHIVE_TAG_CHARS = 20  # a one-word tag in a list archive's copy
_VIA_LIST = re.compile(r"\s+via\s+\S.*$", re.IGNORECASE | re.DOTALL)
# What mailing lists add to a message's text (see _strip_list_footers).
_QUOTE_PREFIX = re.compile(r"[ \t]*(?:>[ \t]*)*")
_FOOTER_RULE = re.compile(r"_{30,}")  # mailman's
_SEPARATOR = re.compile(r"--|[-=_~*]{10,}")  # a signature line or another rule
_LIST_MARK = re.compile(
    r"/listinfo\b|/mailman/|/pipermail/|[\w.][-+](?:leave|request|unsubscribe|subscribe|owner)@",
    re.IGNORECASE,
)
_LIST_TRACES = re.compile(
    r"_{30}|/listinfo\b|/mailman/|/pipermail/|[-+](?:leave|request|unsubscribe|subscribe|owner)@"
    r"|version deleted\]\]|was scrubbed\.\.\.",
    re.IGNORECASE,
)
_LIST_NOTE = re.compile(
    r"\[\[alternative (?:HTML|text) version deleted\]\]|-+ next part -+"
    r"|An embedded and charset-unspecified text was scrubbed\.\.\."
    r"|(?:A non-text attachment|An embedded message|An HTML attachment) was scrubbed\.\.\.",
    re.IGNORECASE,
)
_SCRUBBED = re.compile(r"was scrubbed\.\.\.", re.IGNORECASE)
_SCRUBBED_FIELD = re.compile(r"(?:Name|Type|Size|Desc|URL|From|Subject|Date): ")
# Mailman's "Some-list mailing list" (or "Some-list at example.org mailing list").
_FOOTER_NAME = re.compile(
    r"([^\s<>@]+)(?:[ \t]+(?:at|@)[ \t]+\S+|@\S+)?[ \t]+mailing[ \t]+list\b", re.IGNORECASE
)
_AD_RULE = re.compile(r"[-=_]{20,}")  # an advertisement's top rule, glued to a footer
_FRAMING_RULE = re.compile(r"-{20,}")  # the rules framing an advertisement
_FOOTER_LINES = 12  # lines of a footer block after its separator
_AD_LINES = 8  # lines of an advertisement glued to a footer
_TRAILER_PARAGRAPHS = 3
_TRAILER_LINES = 15
_MAX_FOOTER_LINE_CHARS = 300  # of each line, for the patterns above
_MAX_FOOTERS = 20
# List archives: pipermail writes `jane at example.org (Jane Doe)`; some archives write a
# lossy `j@ne @end|ng |rom ex@mple@org`, whose address cannot be read back.
_ARCHIVED_SENDER = re.compile(
    r'"?(?P<local>[^\s"()<>]+) (?P<how>at|@end\|ng \|rom|@ending from) (?P<domain>[^\s"()<>]+)'
    r'(?:\s*\((?P<name>(?:[^()]|\([^()]*\))*)\))?"?'
)
_READABLE_LOCAL = re.compile(r"[\w.+-]+")
_READABLE_DOMAIN = re.compile(r"[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
_ARCHIVED_ADDRESS = re.compile(r"(?<![\w.+-])([\w.+-]+) at ((?:[\w-]+\.)+[^\W\d_]{2,})(?![\w-])")
_LOST_ADDRESS = re.compile(
    r'(?<![^\s<>()"])<?[^\s<>()"]+ (?:@end\|ng \|rom|@ending from) [^\s<>()"]+>?'
)
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1a\x1c-\x1f]")

# Declared charsets read as the superset that mail software actually writes (WHATWG).
_CHARSET_SUPERSETS = {
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "windows-31j": "cp932",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "big5": "big5hkscs",
}
# Labels that name no charset: read like an undeclared part.
_NO_CHARSET = frozenset({"us-ascii", "ascii", "unknown-8bit", "x-unknown", "unknown", "default"})


@dataclass(frozen=True)
class Link:
    """A link in the body: its target, the text shown for it ('' for a bare URL), and the
    target's host ('' when it has none)."""

    url: str
    text: str
    domain: str


@dataclass(frozen=True)
class Attachment:
    """A non-body MIME part: its file name ('' if none), content type and decoded size."""

    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class ParsedEmail:
    """The sender-side content of one message, recipients' addresses already masked.

    `recipients` lists the addresses that were masked; it is never rendered. `defects`
    are short notes on what was malformed or cut; `truncated_bytes` says the message was
    longer than the parser's `max_bytes` and only its beginning was read.
    """

    subject: str
    from_display: str
    from_address: str
    from_domain: str
    reply_to: str
    body_text: str
    links: tuple[Link, ...]
    attachments: tuple[Attachment, ...]
    recipients: tuple[str, ...]
    defects: tuple[str, ...]
    truncated_bytes: bool


def parse_email(
    raw: bytes, *, max_bytes: int = 4 * 1024 * 1024, max_depth: int = 20, max_parts: int = 200
) -> ParsedEmail:
    """Parse `raw` (one RFC 822 message, an mbox `From ` line first allowed).

    Only the first `max_bytes` are read (cut at a line break; `truncated_bytes` is set),
    MIME parts nested deeper than `max_depth` and parts beyond the first `max_parts` are
    ignored (with a defect note). InvalidMessage if `raw` is empty or not a message.
    """
    if max_bytes < 1 or max_parts < 1 or not 0 <= max_depth <= 100:
        raise ValueError("need max_bytes >= 1, max_parts >= 1 and 0 <= max_depth <= 100")
    truncated = len(raw) > max_bytes
    data = raw[: raw.rfind(b"\n", 0, max_bytes) + 1 or max_bytes] if truncated else raw
    start = _message_start(data)
    root, limit_note = _parse(data, start, max_depth, max_parts)
    if not root.keys():
        sample = data[start : start + 512]
        kind = "binary data" if _BINARY_BYTES.search(sample) else "text"
        raise InvalidMessage(f"not an RFC 822 message: {kind} without header fields")

    mailing_list = _mailing_list(root)
    walker = _Walker(max_depth, max_parts, mailing_list)
    walker.walk(root, 0, visible=True)
    recipients = tuple(dict.fromkeys(_recipient_addresses(root) + walker.recipients).keys())[
        :_MAX_RECIPIENTS
    ]
    # A list's address is told apart only where it would be masked anyway (the message
    # was sent to the list): list fields, like any header, can be forged, and must not
    # let a sender hide an address that would otherwise show.
    relaying = tuple(a for a in mailing_list.addresses if a in recipients)
    mask = functools.partial(_mask, recipients=recipients, lists=relaying)

    archived = _archived_sender(root)
    from_display, from_address = archived or _first_address(root, "from")
    if _anonymised(from_address) and not any(r in from_address.lower() for r in recipients):
        # Not the recipient's own address but one the corpus made unreadable: showing it
        # as RECIPIENT_PLACEHOLDER would fake a sender spoofing the recipient.
        from_address = ""
    from_address = mask(from_address)
    reply_to = mask(_first_address(root, "reply-to")[1])
    if reply_to == LIST_PLACEHOLDER:
        reply_to = ""  # the list's setting, not the sender's
    if from_address == LIST_PLACEHOLDER:
        # A list rewrote From to its own address and (mailman, Google Groups) moved the
        # author's to Reply-To: the author is who wrote it.
        from_display = _person_via_list(from_display, mailing_list)
        if reply_to and not reply_to.startswith("<"):
            from_address = reply_to
    texts = [_read_archived_addresses(t) for t in walker.texts] if archived else walker.texts
    body = _normalise_text("\n\n".join(texts))[:MAX_BODY_CHARS]
    subject = _strip_list_tag(
        _header(root, "subject"), mailing_list, walker.footer_names, archive=bool(archived)
    )
    notes = [f"only the first {len(data)} of {len(raw)} bytes were read"] if truncated else []
    notes += [limit_note] if limit_note else []
    return ParsedEmail(
        subject=mask(subject),
        from_display=mask(from_display),
        from_address=from_address,
        from_domain=_domain_of(from_address),
        reply_to=reply_to,
        body_text=mask(body),
        links=tuple(_links(walker.links, mask)),
        attachments=tuple(
            Attachment(mask(a.filename), a.content_type, a.size) for a in walker.attachments
        ),
        recipients=recipients,
        defects=tuple(dict.fromkeys(notes + walker.notes).keys())[:MAX_DEFECTS],
        truncated_bytes=truncated,
    )


def decode_text(data: bytes, charset: str | None) -> tuple[str, str | None]:
    """`data` decoded as `charset`, and a note when the charset was unusable.

    Known charsets decode with replacement characters for bad bytes (read as the superset
    mail software writes: windows-1252 for latin-1, gb18030 for gb2312...). An absent,
    ASCII or unknown charset reads as UTF-8 if the bytes are valid UTF-8, else windows-1252.
    """
    label = (charset or "").strip().strip("\"'").lower()
    codec = _codec(label)
    if codec is not None:
        try:
            return data.decode(codec, "replace"), None
        except Exception:  # not a text codec (base64, rot13...) or one that rejects anyway
            pass
    note = f"unknown charset {label[:40]!r}" if label and label not in _NO_CHARSET else None
    try:
        return data.decode("utf-8"), note
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace"), note


@functools.lru_cache(maxsize=256)
def _codec(label: str) -> str | None:
    """The Python codec for a charset label; None for no charset or an unknown one."""
    if not label or label in _NO_CHARSET or len(label) > 40:
        return None
    name = _CHARSET_SUPERSETS.get(label, label)
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def _message_start(data: bytes) -> int:
    """Offset of the first header line: leading blank lines and an mbox `From ` line
    skipped. InvalidMessage("empty message") if nothing else is there."""
    first = _NON_SPACE.search(data)
    if first is None:
        raise InvalidMessage("empty message")
    start = first.start()
    if _MBOX_FROM.match(data, start):
        end = data.find(b"\n", start)
        after = _NON_SPACE.search(data, end + 1) if end >= 0 else None
        if after is None:
            raise InvalidMessage("empty message")
        start = after.start()
    return start


class _LenientPolicy(EmailPolicy):
    """policy.default, except that reading a header is bounded in time and never raises.

    Values are cut to _MAX_HEADER_CHARS and their raw 8-bit bytes decoded like an
    undeclared body (UTF-8, else windows-1252) rather than kept as surrogates. MIME fields
    come back as plain strings with at most _MAX_MIME_PARAMS parameters: email.message
    reads them as strings anyway, and parsing them into header objects is quadratic in
    time and memory on hostile values. A value that policy.default cannot parse comes back
    as plain text, encoded words decoded leniently.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name"):  # already a header object
            return value
        text = _header_text(value, _MAX_HEADER_CHARS)
        if name.lower() in _MIME_FIELDS:
            params = _EMPTY_PARAMS.sub(";", _ANY_WHITESPACE.sub(" ", text)).split(
                ";", _MAX_MIME_PARAMS
            )
            return ";".join(params[:_MAX_MIME_PARAMS]).strip()
        try:
            return super().header_fetch_parse(name, text)
        except Exception:  # IndexError, HeaderParseError, RecursionError... seen in 3.11
            return _decode_words(_ANY_WHITESPACE.sub(" ", text).strip())


_POLICY = _LenientPolicy()


class _Limits:
    """Counts the parts the parser creates and how deep they nest, and notes the first
    limit crossed; the caller stops feeding the parser then."""

    def __init__(self, max_depth: int, max_parts: int) -> None:
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.parts = 0
        self.note: str | None = None

    def new_part(self, policy: Any = None) -> _Part:
        self.parts += 1
        if self.parts > self.max_parts and self.note is None:
            self.note = f"more than {self.max_parts} MIME parts; the rest was not read"
        return _Part(self, policy=policy)


class _Part(EmailMessage):
    """A message or part that knows its nesting depth (set when the parser attaches it)."""

    def __init__(self, limits: _Limits, policy: Any = None) -> None:
        super().__init__(policy=policy)
        self.limits = limits
        self.depth = 0

    def attach(self, payload: Any) -> None:
        super().attach(payload)
        if isinstance(payload, _Part):
            payload.depth = self.depth + 1
            if payload.depth > self.limits.max_depth and self.limits.note is None:
                self.limits.note = (
                    f"MIME parts nested deeper than {self.limits.max_depth} levels; "
                    "the rest was not read"
                )


def _parse(data: bytes, start: int, max_depth: int, max_parts: int) -> tuple[Message, str | None]:
    """The message tree of data[start:], and a note if a limit stopped the parser early."""
    limits = _Limits(max_depth, max_parts)
    parser = BytesFeedParser(policy=_POLICY.clone(message_factory=limits.new_part))
    line_breaks = 0
    note = None
    try:
        for offset in range(start, len(data), _CHUNK):
            chunk = data[offset : offset + _CHUNK]
            parser.feed(chunk)
            line_breaks += chunk.count(b"\n") + chunk.count(b"\r")
            note = limits.note
            if note is None and line_breaks > _MAX_LINE_BREAKS and offset + _CHUNK < len(data):
                note = f"more than {_MAX_LINE_BREAKS} line breaks; the rest was not read"
            if note:
                break
        return parser.close(), note
    except Exception as error:  # a last line of defence around the stdlib parser
        raise InvalidMessage(f"unparseable MIME structure ({type(error).__name__})") from None


class _Walker:
    """One pass over the parsed tree: body texts, links, attachments, notes, and the
    recipients of attached messages."""

    def __init__(self, max_depth: int, max_parts: int, mailing_list: _MailingList) -> None:
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.mailing_list = mailing_list
        self.parts = 0
        self.texts: list[str] = []
        self.text_chars = 0
        self.links: dict[str, str] = {}  # url -> text, in order of first appearance
        self.attachments: list[Attachment] = []
        self.recipients: list[str] = []
        self.attached_messages = 0
        self.footer_names: list[str] = []  # lists named by the footers taken out
        self.notes: list[str] = []
        self._decoded: dict[int, tuple[str, tuple[Anchor, ...] | None]] = {}

    def walk(self, part: Message, depth: int, *, visible: bool) -> None:
        """Collect `part`; `visible` False collects only its links (an alternative that
        is not the one shown)."""
        self.parts += 1
        if self.parts > self.max_parts or depth > self.max_depth:
            return
        self.notes.extend(_defect_note(defect) for defect in part.defects)
        payload = part.get_payload()
        kind = part.get_content_type()
        if not isinstance(payload, list):
            self._leaf(part, kind, visible=visible)
            return
        children = [child for child in payload if isinstance(child, Message)]
        if kind == "multipart/alternative":
            shown = self._shown_alternative(children)
            for child in children:
                self.walk(child, depth + 1, visible=visible and child is shown)
        elif kind.startswith("multipart/"):
            for child in children:
                self.walk(child, depth + 1, visible=visible)
        elif kind in ("message/rfc822", "message/global"):
            for inner in children:
                self._attached_message(inner, depth, visible=visible)
        # Other message/* (delivery-status...) hold machine-written fields, not the sender's.

    def _attached_message(self, inner: Message, depth: int, *, visible: bool) -> None:
        self.recipients.extend(_recipient_addresses(inner))
        self.attached_messages += 1
        if visible and self.attached_messages <= _MAX_ATTACHED_HEADERS:
            display, address = _first_address(inner, "from")
            sender = f"{display} <{address}>" if display and address else display or address
            subject = _header(inner, "subject")
            self._add_text(f"[Attached message]\nFrom: {sender}\nSubject: {subject}")
        self.walk(inner, depth + 1, visible=visible)

    def _shown_alternative(self, children: list[Message]) -> Message | None:
        """The alternative a reader sees here: the first non-blank text/plain, else the
        last HTML or multipart one, else the first."""
        for child in children:
            kind = child.get_content_type()
            if (
                kind == "text/plain"
                and _is_body_text(child, kind)
                and self._decode(child)[0].strip()
            ):
                return child
        for child in reversed(children):
            if child.get_content_type() == "text/html" or child.is_multipart():
                return child
        return children[0] if children else None

    def _leaf(self, part: Message, kind: str, *, visible: bool) -> None:
        try:
            if _is_body_text(part, kind):
                text, anchors = self._decode(part)
                if visible:
                    self._add_text(text)
                for anchor in anchors or ():
                    self._add_link(anchor.href, anchor.text)
                if anchors is None:  # plain text: its links are the URLs written in it
                    for match in _BARE_URL.finditer(text):
                        if len(self.links) >= MAX_LINKS:
                            break
                        self._add_link(match.group().rstrip(_URL_TRAILER), "")
            elif visible:
                if len(self.attachments) >= MAX_ATTACHMENTS:
                    self.notes.append(f"more than {MAX_ATTACHMENTS} attachments; the rest ignored")
                    return
                filename = _clean_line(_decode_words(part.get_filename() or ""))
                self.attachments.append(Attachment(filename, kind, _decoded_size(part)))
        except Exception as error:  # the stdlib's MIME accessors on hostile input
            self.notes.append(f"unreadable MIME part ({type(error).__name__})")

    def _decode(self, part: Message) -> tuple[str, tuple[Anchor, ...] | None]:
        """Text and anchors of a body part (None for plain text), decoded once; ('', ())
        if it cannot be."""
        key = id(part)
        if key not in self._decoded:
            try:
                self._decoded[key] = self._decode_uncached(part)
            except Exception as error:  # the stdlib's MIME accessors on hostile input
                self.notes.append(f"undecodable text part ({type(error).__name__})")
                self._decoded[key] = ("", ())
        return self._decoded[key]

    def _decode_uncached(self, part: Message) -> tuple[str, tuple[Anchor, ...] | None]:
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            data = b""
        if len(data) > _MAX_PART_BYTES:
            self.notes.append(f"text part longer than {_MAX_PART_BYTES} bytes; cut")
            data = data[:_MAX_PART_BYTES]
        text, note = decode_text(data, part.get_content_charset())
        if note:
            self.notes.append(note)
        if part.get_content_type() == "text/html" or _HTML_START.match(text):
            if len(text) > _MAX_HTML_CHARS:
                self.notes.append(f"HTML part longer than {_MAX_HTML_CHARS} characters; cut")
            converted = html_to_text(text[:_MAX_HTML_CHARS])
            kept, footers = self._without_footers(converted.text)
            anchors = tuple(a for a in converted.anchors if not _in_footer(a, footers))
            return kept, anchors
        return self._without_footers(text)[0], None

    def _without_footers(self, text: str) -> tuple[str, list[str]]:
        """`text` without mailing-list footers, and the footers taken out."""
        kept, footers = _strip_list_footers(text, self.mailing_list)
        if any(_SCRUBBED.search(footer) for footer in footers):
            self.notes.append(ARCHIVE_SCRUBBED)
        for footer in footers:
            if len(self.footer_names) < _MAX_FOOTERS:
                self.footer_names += _footer_names(footer)
        return kept, footers

    def _add_text(self, text: str) -> None:
        if text.strip() and self.text_chars < MAX_BODY_CHARS:
            self.texts.append(text)
            self.text_chars += len(text)

    def _add_link(self, url: str, text: str) -> None:
        url = _ANY_WHITESPACE.sub("", url)[:_MAX_URL_CHARS]
        if not url.lower().startswith(_LINKABLE):
            return
        text = _clean_line(text)[:200]
        if url in self.links:
            if text and not self.links[url]:
                self.links[url] = text
        elif len(self.links) < MAX_LINKS:
            self.links[url] = text


def _is_body_text(part: Message, kind: str) -> bool:
    """Plain text or HTML (of content type `kind`) that is not an attachment; a multipart
    with no usable boundary holds its body as text too."""
    textual = kind in ("text/plain", "text/html") or kind.startswith("multipart/")
    return textual and part.get_content_disposition() != "attachment"


def _decoded_size(part: Message) -> int:
    payload = part.get_payload()
    if not isinstance(payload, str):
        return 0
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    if encoding == "base64":
        # Counted rather than decoded: attachments can be megabytes.
        chars = len(payload) - sum(payload.count(space) for space in " \t\r\n")
        tail = payload[-8:].rstrip()
        return max(0, chars * 3 // 4 - (len(tail) - len(tail.rstrip("="))))
    data = part.get_payload(decode=True)
    return len(data) if isinstance(data, bytes) else 0


def _header_text(raw: str, limit: int) -> str:
    """The first `limit` characters of a raw header value, its 8-bit bytes decoded."""
    raw = raw[:limit]
    if raw.isascii():
        return raw
    try:
        data = raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = raw.encode("utf-8", "replace")
    return decode_text(data, None)[0]


def _decode_words(text: str) -> str:
    """RFC 2047 encoded words in `text` decoded; undecodable ones kept as written."""

    def decode(match: re.Match[str]) -> str:
        charset, kind, payload = match.groups()
        try:
            if kind in "bB":
                data = codecs.decode(payload.encode("ascii") + b"==", "base64")
            else:
                data = codecs.decode(payload.replace("_", " ").encode("ascii"), "quopri")
        except Exception:
            return match.group()
        return decode_text(data, charset.partition("*")[0])[0]

    return _ENCODED_WORD.sub(decode, _BETWEEN_WORDS.sub("?==?", text))


def _header(message: Message, name: str) -> str:
    value = message.get(name)
    return "" if value is None else _clean_line(str(value))


def _first_address(message: Message, name: str) -> tuple[str, str]:
    """(display name, address) of the first mailbox in header `name`; ('', '') if none."""
    value = message.get(name)
    if value is None:
        return "", ""
    for address in getattr(value, "addresses", ())[:1]:
        if address.domain:
            return _clean_line(address.display_name), _clean_line(address.addr_spec)
    # Unparseable or without a domain (`Bank team ,_<x@y.example>`): read it as text, the
    # first address-like word being the address. (email.utils.parseaddr is no fallback:
    # it recurses on the same inputs that policy.default does.)
    raw = next(str(v) for k, v in message.raw_items() if k.lower() == name.lower())
    text = _clean_line(_decode_words(_header_text(raw, _MAX_HEADER_CHARS)))
    match = _ADDRESS.search(text)
    if match is None:
        return text.strip('"'), ""
    return text[: match.start()].strip(' "<,;_'), match.group()


def _recipient_addresses(message: Message) -> list[str]:
    """Lower-cased addresses from the recipient fields and the `for <...>` clauses of
    Received; they are masked, never rendered."""
    found: list[str] = []
    for name, value in message.raw_items():
        field = name.lower()
        if field in _RECIPIENT_FIELDS:
            found += _ADDRESS.findall(_header_text(str(value), _MAX_RECIPIENT_FIELD_CHARS))
        elif field == "received":
            found += _RECEIVED_FOR.findall(_header_text(str(value), _MAX_HEADER_CHARS))
    return [address.strip(".").lower() for address in found if len(address) < 256]


def _mask(text: str, *, recipients: tuple[str, ...], lists: tuple[str, ...] = ()) -> str:
    """`text` with every recipient address, every address in ANONYMISED_DOMAINS and every
    address without a dotted domain replaced by RECIPIENT_PLACEHOLDER, except that those of
    `lists` (recipients that are mailing lists) read LIST_PLACEHOLDER (case-insensitive,
    plain or %40-encoded)."""
    if "@" not in text and "%40" not in text:
        return text

    def replace(match: re.Match[str]) -> str:
        token = match.group().lower().replace("%40", "@")
        domain = token.rpartition("@")[2]
        if any(address in token for address in lists):
            return LIST_PLACEHOLDER
        if "." not in domain or any(r in token for r in recipients) or _anonymised(token):
            return RECIPIENT_PLACEHOLDER
        return match.group()

    return _ADDRESS_TOKEN.sub(replace, text)


def _anonymised(address: str) -> bool:
    """True if `address` is in (a subdomain of) one of ANONYMISED_DOMAINS."""
    domain = address.rpartition("@")[2].strip(" >").lower()
    return any(domain == d or domain.endswith("." + d) for d in ANONYMISED_DOMAINS)


@dataclass(frozen=True)
class _MailingList:
    """What a message says about a mailing list that relayed it.

    `addresses`: the list's addresses (lower case); `names`: list names as `_list_key`s
    (from its addresses and List-Id), to recognise its subject tag; `titles`:
    its descriptions (the List-Id phrase), which are no person's name; `headers`: the
    message has a discussion list manager's fields (_DISCUSSION_LIST_FIELDS)."""

    addresses: tuple[str, ...]
    names: frozenset[str]
    titles: frozenset[str]
    headers: bool


def _mailing_list(message: Message) -> _MailingList:
    addresses: list[str] = []
    titles: set[str] = set()
    headers = False
    for name, value in message.raw_items():
        field = name.lower()
        if field not in _LIST_FIELDS:
            continue
        headers = headers or field in _DISCUSSION_LIST_FIELDS
        text = _clean_line(_decode_words(_header_text(str(value), _MAX_HEADER_CHARS)))
        if field == "list-id":
            match = _LIST_ID.search(text)
            if match:  # mailman: <name.host> for name@host
                addresses.append(f"{match[1]}@{match[2]}")
            phrase = text.partition("<")[0].strip(' "')
            if phrase:
                titles.add(_list_key(phrase))
        else:
            addresses += (a.partition("?")[0] for a in _ADDRESS.findall(text))
    found = tuple(dict.fromkeys(a.strip(".").lower() for a in addresses if len(a) < 256))
    names = {_list_key(a.rpartition("@")[0]) for a in found}
    return _MailingList(
        addresses=found[:_MAX_RECIPIENTS],
        names=frozenset(names - {""}),
        titles=frozenset(titles - {""}),
        headers=headers,
    )


def _list_key(name: str) -> str:
    """A list name compared loosely: lower case, letters and digits only."""
    return _LIST_KEY_JUNK.sub("", name.lower())


def _strip_list_tag(
    subject: str, mailing_list: _MailingList, footer_names: Sequence[str], *, archive: bool
) -> str:
    """`subject` without a leading list tag (`Re: [Some-list] x` -> `Re: x`): a tag that
    names the message's list (by its headers or by a footer taken out of the body), or a
    one-word tag in mail with list headers (or, shorter, in a list archive's copy). Reply
    prefixes stay; so does a tag with nothing after it."""
    match = _SUBJECT_TAG.match(subject)
    if match is None:
        return subject
    tag = match[2].strip()
    key = _list_key(tag)
    one_word = bool(key) and not any(space.isspace() for space in tag)
    names = mailing_list.names | {_list_key(name) for name in footer_names} - {""}
    names_list = bool(key) and any(
        key == name or (min(len(key), len(name)) >= 2 and (key in name or name in key))
        for name in names
    )
    if (
        names_list
        or (mailing_list.headers and one_word and len(tag) <= _LIST_TAG_CHARS)
        or (archive and one_word and len(tag) <= _ARCHIVE_TAG_CHARS)
    ):
        return match[1] + subject[match.end() :]
    return subject


def _person_via_list(display: str, mailing_list: _MailingList) -> str:
    """The person's name in a From that a list rewrote to its own address: `Jane via
    Some-list` -> `Jane`; '' when the name is the list's own description."""
    name = _VIA_LIST.sub("", display).strip(" '\"")
    key = _list_key(name)
    return "" if key in mailing_list.titles or key in mailing_list.names else name


def _strip_list_footers(text: str, mailing_list: _MailingList) -> tuple[str, list[str]]:
    """`text` without what mailing lists add to it, and the pieces taken out.

    - A footer block, wherever it is (quoted copies in replies too): a separator line
      (mailman's rule of 30+ underscores, a `--` signature line, or another rule), then
      up to _FOOTER_LINES non-blank lines at the same quote depth of which one shows a
      list manager (_LIST_MARK: a listinfo, mailman or pipermail page, an address such
      as `list-leave@` or `group+unsubscribe@`); after mailman's rule, a line that starts
      `Some-list mailing list` is enough. An advertisement glued above it (a rule of
      dashes with no blank line before the footer) goes with it.
    - In mail from a discussion list (`mailing_list.headers`), the end of the text from
      the first of its last _TRAILER_PARAGRAPHS paragraphs that shows a list manager, and
      an advertisement framed by rules just above it.
    - Notes of list archives and content filters (`[[alternative HTML version deleted]]`,
      pipermail's `... was scrubbed...` with its Name/Type/URL lines).

    Unsubscribe text of newsletters and other senders, without these marks, stays.
    """
    if not _LIST_TRACES.search(text):
        return text, []
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    quoted = [_read_line(line[:_MAX_FOOTER_LINE_CHARS]) for line in lines]
    spans: list[tuple[int, int]] = []
    index = 0
    while index < len(lines):
        end = _footer_block_end(quoted, index)
        if end is None:
            index += 1
            continue
        spans.append((_glued_ad_start(quoted, index), end))
        index = end
    index = 0
    while index < len(lines):
        if _LIST_NOTE.fullmatch(quoted[index].text):
            start = index
            while index + 1 < len(lines) and _SCRUBBED_FIELD.match(quoted[index + 1].text):
                index += 1
            spans.append((start, index + 1))
        index += 1
    drop = [False] * len(lines)
    for start, end in spans:
        drop[start:end] = [True] * (end - start)
    if mailing_list.headers:
        trailer = _trailer_start(quoted, drop)
        if trailer is not None:
            spans.append((trailer, len(lines)))
            drop[trailer:] = [True] * (len(lines) - trailer)
    if not spans:
        return text, []
    footers = ["\n".join(lines[start:end]) for start, end in spans]
    return "\n".join(line for line, gone in zip(lines, drop, strict=True) if not gone), footers


def _footer_block_end(quoted: list[_Line], index: int) -> int | None:
    """The end (exclusive) of the footer block whose separator is line `index`, or None
    if no footer starts there."""
    depth, content = quoted[index].depth, quoted[index].text
    mailman = bool(_FOOTER_RULE.fullmatch(content))
    if not mailman and not _SEPARATOR.fullmatch(content):
        return None
    end = index + 1
    while (
        end < len(quoted)
        and end - index <= _FOOTER_LINES
        and quoted[end].depth == depth
        and quoted[end].text
    ):
        end += 1
    block = quoted[index + 1 : end]
    if any(line.marked or (mailman and line.named) for line in block):
        return end
    return None


def _glued_ad_start(quoted: list[_Line], index: int) -> int:
    """Where an advertisement glued above the footer at line `index` starts (a rule of
    dashes up to _AD_LINES lines above, no blank line between); `index` if none."""
    depth = quoted[index].depth
    for above in range(index - 1, max(index - 1 - _AD_LINES, -1), -1):
        if quoted[above].depth != depth or not quoted[above].text:
            break
        if _AD_RULE.fullmatch(quoted[above].text):
            return above
    return index


def _trailer_start(quoted: list[_Line], drop: list[bool]) -> int | None:
    """Where a list's trailer starts in mail with list headers: the first of the last
    _TRAILER_PARAGRAPHS paragraphs (unquoted, at most _TRAILER_LINES lines in all, lines
    already dropped left out) that shows a list manager (_LIST_MARK); an advertisement
    framed by rules just above it starts it instead. None if there is none, or if
    nothing the sender wrote would be left before it.
    """
    paragraphs: list[list[int]] = []  # from the end, each in order
    current: list[int] = []
    seen = 0
    for i in range(len(quoted) - 1, -1, -1):
        if drop[i]:
            continue
        if quoted[i].text:
            current.append(i)
            seen += 1
        elif current:
            paragraphs.append(current[::-1])
            current = []
        if len(paragraphs) > _TRAILER_PARAGRAPHS or seen > _TRAILER_LINES + _AD_LINES:
            break
    if current:
        paragraphs.append(current[::-1])
    start = None
    lines = 0
    for number, paragraph in enumerate(paragraphs[:_TRAILER_PARAGRAPHS]):
        lines += len(paragraph)
        if lines > _TRAILER_LINES or any(quoted[i].depth for i in paragraph):
            break  # too long, or quoted text: a list appends its trailer unquoted
        if any(quoted[i].marked for i in paragraph):
            start = number
    if start is None:
        return None
    first = paragraphs[start][0]
    if start + 1 < len(paragraphs):
        above = paragraphs[start + 1]
        if len(above) <= _AD_LINES and all(
            _FRAMING_RULE.search(quoted[i].text) for i in (above[0], above[-1])
        ):
            first = above[0]
    if not any(quoted[i].text and not drop[i] for i in range(first)):
        return None  # all the text would go: it is what the sender wrote
    return first


class _Line(NamedTuple):
    """One line of body text as the footer rules read it: its quote depth, the text after
    the quote marks (stripped), whether it shows a list manager (_LIST_MARK) and whether
    it starts `Some-list mailing list` (_FOOTER_NAME)."""

    depth: int
    text: str
    marked: bool
    named: bool


def _read_line(line: str) -> _Line:
    depth, text = _split_quote(line)
    marked = ("/" in text or "@" in text) and bool(_LIST_MARK.search(text))
    named = "mailing" in text.lower() and bool(_FOOTER_NAME.match(text))
    return _Line(depth, text, marked, named)


def _split_quote(line: str) -> tuple[int, str]:
    """(quote depth, the rest) of one line: `> > text` -> (2, 'text')."""
    prefix = _QUOTE_PREFIX.match(line)
    end = prefix.end() if prefix else 0
    return line[:end].count(">"), line[end:].strip()


def _footer_names(footer: str) -> list[str]:
    """The list names a footer gives (`Some-list mailing list`)."""
    lines = (_split_quote(line[:_MAX_FOOTER_LINE_CHARS])[1] for line in footer.split("\n"))
    return [m[1] for line in lines if (m := _FOOTER_NAME.match(line))]


def _in_footer(anchor: Anchor, footers: Sequence[str]) -> bool:
    """True if an HTML anchor was in a footer taken out: its target or its (long enough)
    text is written there."""
    target = anchor.href.removeprefix("mailto:")
    return any(
        target in footer or (len(anchor.text) >= 8 and anchor.text in footer) for footer in footers
    )


def _archived_sender(message: Message) -> tuple[str, str] | None:
    """(name, address) of a From written the way list archives obfuscate it (`jane at
    example.org (Jane Doe)`); the address is '' where the archive made it unreadable.
    None for any other From."""
    raw = next((str(v) for k, v in message.raw_items() if k.lower() == "from"), None)
    if raw is None:
        return None
    text = _clean_line(_decode_words(_header_text(raw, _MAX_HEADER_CHARS)))
    match = _ARCHIVED_SENDER.fullmatch(text)
    if match is None:
        return None
    local, domain = match["local"], match["domain"]
    name = _clean_line(match["name"] or "")
    if match["how"] != "at":  # an obfuscation that cannot be read back
        return name, ""
    if not (_READABLE_LOCAL.fullmatch(local) and _READABLE_DOMAIN.fullmatch(domain)):
        return None  # `Support at PayPal (Team)` is no archive's writing
    address = f"{local}@{domain}"
    # Without a name, archives write the (obfuscated) address in its place.
    return ("" if _read_archived_addresses(name) == address else name), address


def _read_archived_addresses(text: str) -> str:
    """Body text of a list archive's copy with its obfuscated addresses read back (`jane
    at example.org` -> `jane@example.org`) and the unreadable ones taken out."""
    return _ARCHIVED_ADDRESS.sub(r"\1@\2", _LOST_ADDRESS.sub("", text))


def _links(found: dict[str, str], mask: Callable[[str], str]) -> Iterator[Link]:
    """Links from url -> text, masked, deduplicated again (masking can make URLs equal)."""
    seen: set[str] = set()
    for url, text in found.items():
        masked = mask(url)
        if masked not in seen:
            seen.add(masked)
            yield Link(url=masked, text=mask(text), domain=_url_domain(masked))


def _url_domain(url: str) -> str:
    if url.lower().startswith("mailto:"):
        return _domain_of(url[7:].partition("?")[0])
    if url.lower().startswith("www."):
        url = "http://" + url
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".")


def _domain_of(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return domain.strip("[]. >").lower() if at and local else ""


def _defect_note(defect: Exception) -> str:
    words = _CAMEL.sub(" ", type(defect).__name__.removesuffix("Defect")).lower()
    detail = _clean_line(str(defect))[:80]
    return f"{words}: {detail}" if detail else words


def _clean_line(text: str) -> str:
    """One line of text: invisible characters dropped, whitespace runs as one space."""
    return _ANY_WHITESPACE.sub(" ", _INVISIBLE.sub("", text)).strip()


def _normalise_text(text: str) -> str:
    """Body text: newlines unified, invisible characters dropped, spaces collapsed,
    lines stripped, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _WHITESPACE_RUN.sub(" ", _INVISIBLE.sub("", text))
    return _BLANK_LINES.sub("\n\n", _LINE_EDGES.sub("\n", text)).strip()
