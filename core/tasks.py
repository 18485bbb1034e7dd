"""Classification tasks: label words, the question asked, and the prompt version.

These are part of the one rendering of an email (DESIGN invariant 1) and of the scoring
rule (invariant 3): training writes the label word as the assistant's answer, serving
reads the label words' first-token logits at the answer position. Change anything here
or in `phishgate.core.render` and bump PROMPT_VERSION: adapters record the version they
were trained with and servers refuse a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from phishgate.core.errors import ConfigError

PROMPT_VERSION = "pg-prompt-2"


@dataclass(frozen=True)
class Task:
    """A binary classification task over emails.

    `labels` lists the label words, negative first and positive last; each word is the
    whole assistant answer in training, and their first tokens must differ.
    """

    name: str
    labels: tuple[str, ...]
    system_prompt: str

    @property
    def positive_label(self) -> str:
        return self.labels[-1]

    @property
    def negative_label(self) -> str:
        return self.labels[0]


_SYSTEM_TEMPLATE = (
    "You are an email security filter. You read one email as the sender wrote it "
    "(sender, subject, links, attachments, body) and classify it. "
    "Answer with exactly one word: {choices}."
)

TASKS: dict[str, Task] = {
    "phishing": Task(
        name="phishing",
        labels=("legitimate", "phishing"),
        system_prompt=_SYSTEM_TEMPLATE.format(choices="phishing or legitimate")
        + " Phishing is mail that impersonates someone to steal credentials, money or"
        " data, or to deliver malware.",
    ),
    "spam": Task(
        name="spam",
        labels=("legitimate", "spam"),
        system_prompt=_SYSTEM_TEMPLATE.format(choices="spam or legitimate")
        + " Spam is unsolicited bulk mail: advertising, scams, and offers nobody asked for.",
    ),
}


def get_task(name: str) -> Task:
    """The task called `name`; ConfigError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise ConfigError(f"unknown task {name!r}; known tasks: {known}") from None
