"""HTML to plain text and links, as a mail reader would show them.

Built on the standard library's `html.parser`. Block elements become line breaks, runs of
whitespace collapse, `script`/`style`/`head`/`title` and elements hidden by CSS or the
`hidden` attribute are dropped, `<img alt>` is kept as text, and every `<a href>` (and
`<area href>`) is collected with its visible text. Never raises on malformed HTML.

Python 3.11's `HTMLParser` takes quadratic time on start tags that never close
(`<a <a <a ...`, CVE-2025-6069) and raises AssertionError on some marked sections, so the
input is first cleaned in linear time: comments are removed, and a `<` that does not reach
a `>` before the next `<` is dropped with the rest of its tag if it starts one (as a
browser would read `<a <tr>`) or else kept as text.
"""

from __future__ import annotations

import re
from html import unescape
from html.parser import HTMLParser
from typing import NamedTuple

MAX_TEXT_CHARS = 1_000_000
"""Visible text kept per document; the rest is ignored."""
MAX_ANCHORS = 500
"""Anchors kept per document, in document order."""

_BLOCK = frozenset(
    {
        *("address", "article", "aside", "blockquote", "br", "caption", "center", "dd"),
        *("details", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer"),
        *("form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav"),
        *("ol", "p", "pre", "section", "summary", "table", "tbody", "tfoot", "thead", "tr"),
        "ul",
    }
)
_CELL = frozenset({"td", "th"})
_SKIP = frozenset({"script", "style", "title", "template", "head"})
_HEAD_CONTENT = frozenset(
    {"base", "link", "meta", "noscript", "script", "style", "template", "title"}
)
_VOID = frozenset(
    {
        *("area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link"),
        *("meta", "param", "source", "track", "wbr"),
    }
)
_MAX_OPEN = 256  # deeper elements are not tracked (they inherit their ancestors' visibility)

_HIDDEN_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*0+(?:\.0+)?(?:[a-z%]+)?\s*(?:;|!|$)"
    r"|opacity\s*:\s*0+(?:\.0+)?\s*(?:;|!|$)",
    re.IGNORECASE,
)
_STRAY_TAG = re.compile(r"<[a-zA-Z/!?][^<>]*(?=<|\Z)")
_STRAY_LT = re.compile(r"<(?![^<>]*>)")
_WS = re.compile(r"\s+")
_SPACES = re.compile(r"[^\S\n]+")
_LINE_EDGES = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_TAG = re.compile(r"<[^<>]*>")


class Anchor(NamedTuple):
    """A link as written in the HTML: its target and the text a reader sees."""

    href: str
    text: str


class HtmlText(NamedTuple):
    """The visible text of an HTML document and its anchors in document order."""

    text: str
    anchors: tuple[Anchor, ...]


def html_to_text(html: str) -> HtmlText:
    """Visible text and anchors of `html`; never raises, linear in the input's length."""
    cleaned = _STRAY_LT.sub("&lt;", _STRAY_TAG.sub("", _drop_comments(html)))
    parser = _TextParser()
    try:
        parser.feed(cleaned)
        parser.close()
    except Exception:  # html.parser raises on some malformed declarations; read tags away
        return HtmlText(_tidy(unescape(_TAG.sub(" ", cleaned))), parser.finish().anchors)
    return parser.finish()


def _drop_comments(html: str) -> str:
    """`html` without `<!-- ... -->`; an unclosed comment runs to the end, as in browsers."""
    start = html.find("<!--")
    if start < 0:
        return html
    kept: list[str] = []
    pos = 0
    while start >= 0:
        kept.append(html[pos:start])
        end = html.find("-->", start + 4)
        if end < 0:
            return "".join(kept)
        pos = end + 3
        start = html.find("<!--", pos)
    kept.append(html[pos:])
    return "".join(kept)


def _tidy(text: str) -> str:
    """Spaces collapsed inside lines, lines stripped, at most one blank line in a row."""
    lines = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", lines).strip()


def _is_hidden(attrs: list[tuple[str, str | None]]) -> bool:
    for name, value in attrs:
        if name == "hidden" or (name == "aria-hidden" and value == "true"):
            return True
        if name == "style" and value and _HIDDEN_STYLE.search(value):
            return True
    return False


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._chunks: list[str] = []
        self._size = 0
        self._anchors: list[Anchor] = []
        # Open elements and whether each hides its content; `_hidden` counts the hiding ones.
        self._open: list[tuple[str, bool]] = []
        self._hidden = 0
        self._heads = 0
        self._href: str | None = None
        self._anchor_text: list[str] = []

    def finish(self) -> HtmlText:
        self._close_anchor()
        return HtmlText(_tidy("".join(self._chunks)), tuple(self._anchors))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._heads and (tag == "body" or tag not in _HEAD_CONTENT):
            self._pop_to("head")  # a browser ends `head` at the first tag that is not head content
        hides = tag in _SKIP or _is_hidden(attrs)
        if tag in _BLOCK:
            self._emit("\n")
        elif tag in _CELL:
            self._emit(" ")
        visible = not hides and not self._hidden
        if tag in ("a", "area"):
            self._close_anchor()
            named = dict(attrs)
            href = (named.get("href") or "").strip()
            if href and visible:
                self._href = href
                if tag == "area":  # void: its alt text is all the text it has
                    self._anchor_text.append(named.get("alt") or "")
                    self._close_anchor()
        elif tag == "img" and visible:
            alt = dict(attrs).get("alt")
            if alt and alt.strip():
                self.handle_data(f" {alt} ")
        if tag not in _VOID and len(self._open) < _MAX_OPEN:
            self._open.append((tag, hides))
            self._hidden += hides
            self._heads += tag == "head"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # `<div/>` opens nothing in HTML, so only its immediate effects apply.
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._close_anchor()
        self._pop_to(tag)
        if tag in _BLOCK:
            self._emit("\n")
        elif tag in _CELL:
            self._emit(" ")

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        text = _WS.sub(" ", data)
        self._emit(text)
        if self._href is not None:
            self._anchor_text.append(text)

    def _emit(self, text: str) -> None:
        if self._size < MAX_TEXT_CHARS and not self._hidden:
            self._chunks.append(text)
            self._size += len(text)

    def _pop_to(self, tag: str) -> None:
        """Close the innermost open `tag` and everything opened inside it; no-op if none."""
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                for name, hides in self._open[index:]:
                    self._hidden -= hides
                    self._heads -= name == "head"
                del self._open[index:]
                return

    def _close_anchor(self) -> None:
        if self._href is not None and len(self._anchors) < MAX_ANCHORS:
            text = _WS.sub(" ", "".join(self._anchor_text)).strip()
            self._anchors.append(Anchor(self._href, text))
        self._href = None
        self._anchor_text = []
