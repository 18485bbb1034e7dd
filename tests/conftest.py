"""Shared fixtures: the real base model, prepared once into the project's state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from phishgate.core.settings import CoreSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def core_settings() -> CoreSettings:
    return CoreSettings(home=REPO_ROOT / "var")


@pytest.fixture(scope="session")
def prepared_model(core_settings: CoreSettings) -> Any:
    """The SmolLM2-135M-Instruct checkpoint in the local cache (prepared on first use)."""
    from phishgate.core.model import prepare_base_model

    return prepare_base_model(core_settings)


@pytest.fixture(scope="session")
def tokenizer(prepared_model: Any) -> Any:
    from phishgate.core.model import load_tokenizer

    return load_tokenizer(prepared_model.path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"labelled corpora not found at {SHARED_DATA}")
    return SHARED_DATA


PHISHING_TEMPLATES = [
    (
        "PayPal Service <service@paypa1-secure{n}.example>",
        "Your account is limited",
        "Dear customer, we noticed unusual activity. Verify your identity within 24 hours at "
        "https://paypa1-secure{n}.example/login?id={n} or your account will be suspended.",
    ),
    (
        "IT Helpdesk <helpdesk@mail-quota{n}.example>",
        "Mailbox quota exceeded",
        "Your mailbox is full. Click https://mail-quota{n}.example/upgrade to keep receiving "
        "mail and re-enter your password to confirm.",
    ),
]
LEGITIMATE_TEMPLATES = [
    (
        "Alice Martin <alice@university{n}.example>",
        "Minutes of Tuesday's seminar",
        "Hi all, attached are the minutes of the seminar number {n}. The next meeting is on "
        "Thursday in room 204; please send agenda items by Wednesday.",
    ),
    (
        "R-help digest <r-help@lists{n}.example>",
        "Re: lm() with factor interactions",
        "You can use lm(y ~ a * b, data = d) and then anova() to compare the models; see "
        "chapter {n} of the manual for the details.",
    ),
]


def synthetic_email(sender: str, subject: str, body: str) -> bytes:
    """A small RFC 822 message; the test corpus is made here, never copied from shared/."""
    return (
        f"From: {sender}\r\nTo: someone@example.org\r\nSubject: {subject}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """train/dev/test.jsonl for the phishing task, rendered by the real renderer."""
    import json

    from phishgate.core.render import render_email, training_example
    from phishgate.core.tasks import get_task

    task = get_task("phishing")
    folder = tmp_path_factory.mktemp("tiny-data")
    sizes = {"train": 12, "dev": 6, "test": 6}
    n = 0
    for split, count in sizes.items():
        rows = []
        for i in range(count):
            n += 1
            label, templates = (
                ("phishing", PHISHING_TEMPLATES) if i % 2 else ("legitimate", LEGITIMATE_TEMPLATES)
            )
            sender, subject, body = (part.format(n=n) for part in templates[n % 2])
            rendered = render_email(synthetic_email(sender, subject, body), task, tokenizer, 256)
            row = {
                "id": f"synthetic:{n}",
                "source": "synthetic",
                "label": label,
                "n_tokens": rendered.n_tokens,
                "lang": "en",
            }
            rows.append({**row, **training_example(rendered, label, task)})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
