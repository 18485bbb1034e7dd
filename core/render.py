"""The one rendering of an email into the model's input (DESIGN invariant 1).

Training, eval and serving all call `render_email` (or `render_parsed` after their own
`parse_email`), so the model reads exactly the same text in every role. The user turn is
a compact, deterministic layout of sender-side content only (invariant 2):

    From: "PayPal Service" <no-reply@paypa1-secure.com> (domain: paypa1-secure.com)
    Reply-To: collect@elsewhere.example
    Subject: Your account is on hold
    Attachments: invoice.pdf.exe (application/octet-stream, 12 KB)
    Links:
    - [www.paypal.com] -> https://evil.example/login (evil.example)
    Body:
    Dear <recipient>, ...

Reply-To appears only when it differs from From; Attachments and Links only when there
are some. Addresses may read `<recipient>` (the recipient's own, e.g. a From spoofing the
victim's address) or `<mailing-list>` (a list the message was sent to; a From that a list
rewrote to itself shows the author's name, and address where the list kept it); what
lists add (footers, subject tags) is already gone (`phishgate.core.mime`). Changing this
layout, or what `parse_email` keeps, changes what adapters were trained on: bump
`phishgate.core.tasks.PROMPT_VERSION`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phishgate.core.errors import ConfigError
from phishgate.core.mime import Attachment, Link, ParsedEmail, parse_email
from phishgate.core.tasks import PROMPT_VERSION, Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_BODY_CHARS = 20_000
TRUNCATION_MARKER = "\n[...]\n"
"""Stands where the middle of a body that did not fit was cut out."""
MAX_RENDERED_LINKS = 10
MAX_RENDERED_ATTACHMENTS = 10

_HEAD_SHARE = 2 / 3  # of a cut body's budget, for its beginning; the rest is its end
_LINK_SHARE = 0.3  # of the tokens left after the headers, links may take at least this
# More body characters than a token covers on average in any real text; a longer body is
# first cut to this many characters per token of budget, so tokenising stays cheap.
_CHARS_PER_TOKEN = 8
_MIN_STEP = 8  # tokens shed per retry when a cut text re-tokenises longer than planned
_SUBJECT_CHARS = 300
_NAME_CHARS = 100
_ADDRESS_CHARS = 120
_FILENAME_CHARS = 80
_URL_CHARS = 100
_LINK_TEXT_CHARS = 60
_DOMAIN_IN_TEXT = re.compile(r"(?<![\w.-])((?:[a-z0-9-]+\.)+[a-z]{2,})(?![\w-])", re.IGNORECASE)


@dataclass(frozen=True)
class RenderedEmail:
    """What the model reads for one email.

    `prompt_ids` is the tokenizer's chat template applied to `messages` (system, user)
    with the generation prompt, so the label word follows it directly; `n_tokens` is its
    length, never more than the budget it was rendered for. `truncated` says the body (or
    the link list) was cut to fit.
    """

    messages: tuple[dict[str, str], ...]
    prompt_ids: tuple[int, ...]
    n_tokens: int
    truncated: bool
    prompt_version: str
    task: Task


def render_email(
    raw: bytes, task: Task, tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> RenderedEmail:
    """Parse `raw` and render it for `task` within `max_tokens` (chat template included).

    InvalidMessage from `parse_email` propagates; ConfigError if the tokenizer has no chat
    template or `max_tokens` cannot even hold the system prompt.
    """
    return render_parsed(parse_email(raw), task, tokenizer, max_tokens)


def render_parsed(
    parsed: ParsedEmail, task: Task, tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> RenderedEmail:
    """Render an already parsed email; see `render_email`.

    When everything does not fit, headers and attachments stay, the link list is shortened
    (least telling links first) and the body keeps its first ~2/3 and last ~1/3 of the
    tokens left, joined by TRUNCATION_MARKER.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template")
    neutral = _neutraliser(tokenizer)
    head = [neutral(line) for line in _header_lines(parsed)]
    links = [neutral(_link_line(link)) for link in _ranked_links(parsed.links)]
    full_body = neutral(parsed.body_text)
    body = _clip_chars(full_body, _CHARS_PER_TOKEN * max_tokens)
    user = _user_text(head, links, body)
    ids = _prompt_ids(tokenizer, task, user)
    truncated = body != full_body
    if len(ids) > max_tokens:
        user, ids = _fit(tokenizer, task, head, links, body, max_tokens)
        truncated = True
    return RenderedEmail(
        messages=tuple(_messages(task, user)),
        prompt_ids=tuple(ids),
        n_tokens=len(ids),
        truncated=truncated,
        prompt_version=PROMPT_VERSION,
        task=task,
    )


def render_text(parsed: ParsedEmail, *, max_body_chars: int = DEFAULT_MAX_BODY_CHARS) -> str:
    """The user turn for `parsed` with no token budget: the body cut to `max_body_chars`
    (beginning and end kept), at most MAX_RENDERED_LINKS links."""
    links = [_link_line(link) for link in _ranked_links(parsed.links)]
    return _user_text(_header_lines(parsed), links, _clip_chars(parsed.body_text, max_body_chars))


def training_example(rendered: RenderedEmail, label: str, task: Task) -> dict[str, Any]:
    """The chat-format training record: system, user, and `label` as the assistant's answer.

    ValueError if `label` is not one of `task.labels`, or `rendered` was made for another
    task or prompt version.
    """
    if label not in task.labels:
        raise ValueError(f"label {label!r} is not one of {task.labels} (task {task.name!r})")
    if rendered.task != task:
        raise ValueError(f"email rendered for task {rendered.task.name!r}, not {task.name!r}")
    if rendered.prompt_version != PROMPT_VERSION:
        raise ValueError(
            f"email rendered with prompt {rendered.prompt_version!r}, not {PROMPT_VERSION!r}"
        )
    answer = {"role": "assistant", "content": label}
    return {"messages": [*(dict(message) for message in rendered.messages), answer]}


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> tuple[int, ...]:
    """The model's input for a stored (system, user) conversation: the chat template with
    the generation prompt, exactly as `render_parsed` encodes it. ValueError for any other
    sequence of roles."""
    roles = [message["role"] for message in messages]
    if roles != ["system", "user"]:
        raise ValueError(f"expected a system and a user message, got roles {roles}")
    ids = tokenizer.apply_chat_template(
        [dict(message) for message in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    return tuple(int(i) for i in ids)


def rendered_from_messages(
    messages: Sequence[Mapping[str, str]], task: Task, tokenizer: PreTrainedTokenizerBase
) -> RenderedEmail:
    """The RenderedEmail of a stored (system, user) conversation, e.g. a split file's row.

    ValueError if the system message is not `task`'s system prompt (the row was rendered
    for another task or prompt version). Not marked truncated: rows do not record it.
    """
    ids = encode_prompt(tokenizer, messages)
    if messages[0]["content"] != task.system_prompt:
        raise ValueError(f"messages were not rendered for task {task.name!r} ({PROMPT_VERSION})")
    conversation = tuple(dict(message) for message in messages)
    return RenderedEmail(conversation, ids, len(ids), False, PROMPT_VERSION, task)


def _fit(
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    head: list[str],
    links: list[str],
    body: str,
    max_tokens: int,
) -> tuple[str, list[int]]:
    """User text and prompt ids within `max_tokens`: links shortened, body middle cut."""
    room = max_tokens - len(_prompt_ids(tokenizer, task, _user_text(head, [], "")))
    if room <= 0:
        return _hard_cut(tokenizer, task, _user_text(head, [], body), max_tokens)
    body_ids = _encode(tokenizer, body)
    marker = len(_encode(tokenizer, TRUNCATION_MARKER))
    link_room = max(int(room * _LINK_SHARE), room - len(body_ids))
    kept: list[str] = []
    used = 0
    for line in links:
        cost = len(_encode(tokenizer, f"\n{line}")) + (0 if kept else 2)  # 2: "Links:"
        if used + cost > link_room:
            break
        kept.append(line)
        used += cost
    body_room = room - used
    while True:
        if len(body_ids) <= body_room:
            text = body
        elif body_room > marker:
            text = _cut_ids(tokenizer, body_ids, body_room - marker)
        else:
            break
        user = _user_text(head, kept, text)
        ids = _prompt_ids(tokenizer, task, user)
        if len(ids) <= max_tokens:
            return user, ids
        body_room -= max(len(ids) - max_tokens, _MIN_STEP)
    return _hard_cut(tokenizer, task, _user_text(head, [], body), max_tokens)


def _hard_cut(
    tokenizer: PreTrainedTokenizerBase, task: Task, user: str, max_tokens: int
) -> tuple[str, list[int]]:
    """The beginning of `user` that fits: the last resort when the headers alone do not."""
    bare = len(_prompt_ids(tokenizer, task, ""))
    if bare >= max_tokens:
        raise ConfigError(
            f"max_tokens={max_tokens} cannot hold the system prompt and chat template "
            f"({bare} tokens)"
        )
    user_ids = _encode(tokenizer, user)
    keep = max_tokens - bare
    while keep > 0:
        text = _decode(tokenizer, user_ids[:keep]).rstrip("\ufffd")
        ids = _prompt_ids(tokenizer, task, text)
        if len(ids) <= max_tokens:
            return text, ids
        keep -= max(len(ids) - max_tokens, _MIN_STEP)
    return "", _prompt_ids(tokenizer, task, "")


def _cut_ids(tokenizer: PreTrainedTokenizerBase, ids: list[int], keep: int) -> str:
    """The text of the first ~2/3 and last ~1/3 of `keep` tokens of `ids`, marker between."""
    head = round(keep * _HEAD_SHARE)
    tail = keep - head
    start = _decode(tokenizer, ids[:head]).rstrip("\ufffd").rstrip()
    end = _decode(tokenizer, ids[len(ids) - tail :]).lstrip("\ufffd").lstrip() if tail else ""
    return start + TRUNCATION_MARKER + end


def _messages(task: Task, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": task.system_prompt}, {"role": "user", "content": user}]


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, task: Task, user: str) -> list[int]:
    return list(encode_prompt(tokenizer, _messages(task, user)))


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=False))


def _neutraliser(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], str]:
    """A function that breaks up the tokenizer's special-token strings in email text.

    Otherwise `<|im_end|>` written in a body would tokenise as the real control token and
    let a sender forge the end of the user turn (and an answer) in the prompt.
    """
    specials = {*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}
    pattern = _alternation(tuple(sorted(token for token in specials if len(token) > 1)))
    if pattern is None:
        return lambda text: text
    return functools.partial(pattern.sub, lambda match: f"{match[0][0]} {match[0][1:]}")


@functools.lru_cache(maxsize=16)
def _alternation(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    if not tokens:
        return None
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)))


def _user_text(head: list[str], links: list[str], body: str) -> str:
    lines = list(head)
    if links:
        lines += ["Links:", *links]
    lines += ["Body:", body or "(empty)"]
    return "\n".join(lines)


def _header_lines(parsed: ParsedEmail) -> list[str]:
    lines = [f"From: {_sender(parsed)}"]
    if parsed.reply_to and parsed.reply_to.lower() != parsed.from_address.lower():
        lines.append(f"Reply-To: {_cut(parsed.reply_to, _ADDRESS_CHARS)}")
    lines.append(f"Subject: {_cut(parsed.subject, _SUBJECT_CHARS) or '(none)'}")
    if parsed.attachments:
        shown = [_attachment(a) for a in parsed.attachments[:MAX_RENDERED_ATTACHMENTS]]
        more = len(parsed.attachments) - len(shown)
        lines.append("Attachments: " + "; ".join(shown) + (f"; and {more} more" if more else ""))
    return lines


def _sender(parsed: ParsedEmail) -> str:
    words = []
    if parsed.from_display:
        words.append(f'"{_cut(parsed.from_display, _NAME_CHARS)}"')
    if parsed.from_address:
        address = _cut(parsed.from_address, _ADDRESS_CHARS)
        words.append(address if address.startswith("<") else f"<{address}>")
    if parsed.from_domain:
        words.append(f"(domain: {parsed.from_domain})")
    return " ".join(words) or "(none)"


def _attachment(attachment: Attachment) -> str:
    name = _cut(attachment.filename, _FILENAME_CHARS) or "(no name)"
    return f"{name} ({attachment.content_type}, {_size(attachment.size)})"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{round(n / 1024)} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _ranked_links(links: Sequence[Link]) -> list[Link]:
    """At most MAX_RENDERED_LINKS links, most telling first: text naming another domain
    than the target's, then links with text, then bare URLs; one link per domain before
    any domain repeats. Ties keep document order."""
    ranked = sorted(
        links, key=lambda link: 0 if _text_names_other_domain(link) else 2 - bool(link.text)
    )
    seen: set[str] = set()
    first: list[Link] = []
    repeats: list[Link] = []
    for link in ranked:
        (repeats if link.domain in seen else first).append(link)
        seen.add(link.domain)
    return (first + repeats)[:MAX_RENDERED_LINKS]


def _text_names_other_domain(link: Link) -> bool:
    """True when the link's text shows a domain that is not the target's (nor its parent
    or child): `[www.paypal.com] -> https://evil.example/`."""
    match = _DOMAIN_IN_TEXT.search(link.text)
    if match is None or not link.domain:
        return False
    shown = match[1].lower().removeprefix("www.")
    actual = link.domain.lower().removeprefix("www.")
    return not (shown == actual or shown.endswith("." + actual) or actual.endswith("." + shown))


def _link_line(link: Link) -> str:
    where = f" ({link.domain})" if link.domain else ""
    url = _cut(link.url, _URL_CHARS)
    if link.text and link.text != link.url:
        return f"- [{_cut(link.text, _LINK_TEXT_CHARS)}] -> {url}{where}"
    return f"- {url}{where}"


def _clip_chars(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its beginning and end around
    TRUNCATION_MARKER."""
    if len(text) <= limit:
        return text
    head = round(limit * _HEAD_SHARE)
    return text[:head].rstrip() + TRUNCATION_MARKER + text[len(text) - (limit - head) :].lstrip()


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
