"""Benchmark payloads: real messages written as .eml files, with their token counts.

The messages come from a prepared data split (their raw bytes re-read from the sources
recorded in card.json) or from the user's own mail. Each is rendered by the one renderer
at the serving budget to count the tokens the classifier reads, and its hosted-API token
counts are measured with the same tokenizer: the rendered email with an instruction to
answer in JSON as the prompt, a one-key JSON answer as the output.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phishgate.core.errors import ConfigError, InvalidMessage
from phishgate.core.render import render_email
from phishgate.core.tasks import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MANIFEST = "manifest.json"

API_INSTRUCTION = (
    "You are an email security filter. Classify the email below as one of: {choices}. "
    'Reply with JSON only, exactly {{"label": "<one of them>"}}.'
)


@dataclass(frozen=True)
class Payload:
    """One message on disk (`file`, relative to the payload folder) and its token counts.

    `n_tokens` is what the classifier reads (chat template included, within the budget);
    `api_input_tokens` / `api_output_tokens` what a hosted LLM would bill for it.
    """

    file: str
    id: str
    label: str
    n_tokens: int
    truncated: bool
    api_input_tokens: int
    api_output_tokens: int


@dataclass(frozen=True)
class PayloadSet:
    folder: Path
    task: str
    max_input_tokens: int
    source: str
    payloads: tuple[Payload, ...]

    def summary(self) -> dict[str, Any]:
        """Count and mean token counts, what the load and cost reports quote."""
        return {
            "folder": str(self.folder),
            "task": self.task,
            "source": self.source,
            "max_input_tokens": self.max_input_tokens,
            "count": len(self.payloads),
            "mean_tokens": _mean([p.n_tokens for p in self.payloads]),
            "mean_api_input_tokens": _mean([p.api_input_tokens for p in self.payloads]),
            "mean_api_output_tokens": _mean([p.api_output_tokens for p in self.payloads]),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "payloads": [asdict(p) for p in self.payloads]}


def json_prompt_ids(tokenizer: PreTrainedTokenizerBase, task: Task, user_text: str) -> list[int]:
    """The chat prompt asking an LLM for a JSON verdict on the rendered email `user_text`:
    what the hosted API is sent, and what the naive baseline generates from."""
    choices = " or ".join(reversed(task.labels))
    conversation = [
        {"role": "system", "content": API_INSTRUCTION.format(choices=choices)},
        {"role": "user", "content": user_text},
    ]
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return [int(i) for i in ids]


def api_token_counts(
    tokenizer: PreTrainedTokenizerBase, task: Task, user_text: str, label: str
) -> tuple[int, int]:
    """(input, output) tokens of asking a chat LLM for a JSON verdict on `user_text`.

    Counted with `tokenizer`'s chat template: a stand-in for the hosted model's own
    tokenizer, which bills within a few percent on English text.
    """
    answer = tokenizer(json.dumps({"label": label}), add_special_tokens=False)["input_ids"]
    return len(json_prompt_ids(tokenizer, task, user_text)), len(answer)


def write_payloads(
    messages: Sequence[tuple[str, str, bytes]],
    folder: Path,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    max_input_tokens: int,
    source: str,
) -> PayloadSet:
    """Write (id, label, raw) messages as NNNN.eml under `folder` with a manifest.json.

    Messages the renderer rejects are left out (the service would answer
    INVALID_ARGUMENT, which is not what a load test measures). ConfigError if none is left.
    """
    folder.mkdir(parents=True, exist_ok=True)
    payloads: list[Payload] = []
    for ident, label, raw in messages:
        try:
            rendered = render_email(raw, task, tokenizer, max_input_tokens)
        except InvalidMessage:
            continue
        user_text = next(m["content"] for m in rendered.messages if m["role"] == "user")
        answer = label if label in task.labels else task.positive_label
        api_in, api_out = api_token_counts(tokenizer, task, user_text, answer)
        name = f"{len(payloads):04d}.eml"
        (folder / name).write_bytes(raw)
        payloads.append(
            Payload(name, ident, label, rendered.n_tokens, rendered.truncated, api_in, api_out)
        )
    if not payloads:
        raise ConfigError("no renderable message among the payload candidates")
    result = PayloadSet(folder, task.name, max_input_tokens, source, tuple(payloads))
    (folder / MANIFEST).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def split_messages(
    data_dir: Path, split: str, limit: int, seed: int
) -> list[tuple[str, str, bytes]]:
    """A seeded, label-stratified sample of `limit` messages of a prepared split, as
    (id, label, raw bytes). ConfigError if the split or its card.json is missing."""
    from phishgate.training.eval_run import find_raw
    from phishgate.training.evaluate import load_examples, sample

    chosen = sample(load_examples(data_dir / f"{split}.jsonl"), limit, seed)
    raw, _missing = find_raw(data_dir, chosen)
    return [(e.id, e.label, raw[e.id]) for e in chosen if e.id in raw]


def mail_messages(path: Path, limit: int) -> list[tuple[str, str, bytes]]:
    """Up to `limit` *.eml files under `path` (a file or a folder), in name order, unlabelled."""
    files = [path] if path.is_file() else sorted(path.rglob("*.eml"))
    if not files:
        raise ConfigError(f"no .eml files at {path}")
    return [(str(f), "", f.read_bytes()) for f in files[:limit]]


def load_payload_set(folder: Path) -> PayloadSet:
    """The PayloadSet written by `write_payloads`; ConfigError if there is none."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        payloads = tuple(Payload(**row) for row in data["payloads"])
        return PayloadSet(
            folder, data["task"], int(data["max_input_tokens"]), data["source"], payloads
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"no usable payload manifest in {folder}: {exc}") from None


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0
