"""The naive baseline from the literature: generate a JSON answer, then parse it.

Each email is one `generate()` call (greedy, up to `max_new_tokens`) on a prompt asking for
`{"label": ...}`; the label is read from the first JSON object in the text. The same
messages are then scored the phishgate way (`phishgate.core.scoring.TransformersScorer`:
one forward pass, last-position logits), one at a time and in micro-batches, on the same
model, so the report can put the rates side by side.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from phishgate.bench.payloads import json_prompt_ids
from phishgate.core.render import RenderedEmail
from phishgate.core.scoring import TransformersScorer
from phishgate.core.tasks import Task

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The `label` of the first JSON object in `text` when it is one of `labels`, else None."""
    for candidate in _JSON_OBJECT.findall(text):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            label = str(value.get("label", "")).strip().lower()
            return label if label in labels else None
    return None


@dataclass(frozen=True)
class Rate:
    """`emails` scored in `seconds`."""

    emails: int
    seconds: float

    @property
    def emails_per_s(self) -> float:
        return self.emails / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BaselineResult:
    model: str
    emails: int
    mean_tokens: float
    max_new_tokens: int
    generate: Rate
    mean_generated_tokens: float
    unparsed: int
    score_single: Rate
    score_batched: Rate
    batch_size: int
    agreement: float
    """Share of emails where the parsed label equals the scorer's label at threshold 0.5."""
    sample_answers: tuple[str, ...] = ()
    """The first few generated answers, as text."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("generate", "score_single", "score_batched"):
            data[key]["emails_per_s"] = getattr(self, key).emails_per_s
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineResult:
        rates = {
            key: Rate(int(data[key]["emails"]), float(data[key]["seconds"]))
            for key in ("generate", "score_single", "score_batched")
        }
        return cls(
            model=str(data["model"]),
            emails=int(data["emails"]),
            mean_tokens=float(data["mean_tokens"]),
            max_new_tokens=int(data["max_new_tokens"]),
            generate=rates["generate"],
            mean_generated_tokens=float(data["mean_generated_tokens"]),
            unparsed=int(data["unparsed"]),
            score_single=rates["score_single"],
            score_batched=rates["score_batched"],
            batch_size=int(data["batch_size"]),
            agreement=float(data["agreement"]),
            sample_answers=tuple(data.get("sample_answers", ())),
        )


def run_baseline(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    rendered: Sequence[RenderedEmail],
    *,
    model_name: str,
    max_new_tokens: int = 24,
    batch_size: int = 8,
) -> BaselineResult:
    """Time generate-and-parse, then one-pass scoring, on the same `rendered` emails.

    One untimed scoring pass first, so neither approach pays the first call's set-up.
    """
    import torch

    if not rendered:
        raise ValueError("no emails to run the baseline on")
    TransformersScorer(model, tokenizer, task, max_batch_size=1).score_batch(rendered[:1])
    labels: list[str | None] = []
    answers: list[str] = []
    generated = 0
    started = time.perf_counter()
    for item in rendered:
        user_text = next(m["content"] for m in item.messages if m["role"] == "user")
        ids = torch.tensor([json_prompt_ids(tokenizer, task, user_text)])
        with torch.inference_mode():
            output = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[0, ids.shape[1] :]
        generated += int(new.numel())
        answers.append(tokenizer.decode(new, skip_special_tokens=True))
        labels.append(parse_label(answers[-1], task.labels))
    generate = Rate(len(rendered), time.perf_counter() - started)

    single = TransformersScorer(model, tokenizer, task, max_batch_size=1)
    started = time.perf_counter()
    scores = single.score_batch(rendered)
    score_single = Rate(len(rendered), time.perf_counter() - started)
    batched = TransformersScorer(model, tokenizer, task, max_batch_size=batch_size)
    started = time.perf_counter()
    batched.score_batch(rendered)
    score_batched = Rate(len(rendered), time.perf_counter() - started)

    agree = sum(label == score.label for label, score in zip(labels, scores, strict=True))
    return BaselineResult(
        model=model_name,
        emails=len(rendered),
        mean_tokens=sum(r.n_tokens for r in rendered) / len(rendered),
        max_new_tokens=max_new_tokens,
        generate=generate,
        mean_generated_tokens=generated / len(rendered),
        unparsed=sum(label is None for label in labels),
        score_single=score_single,
        score_batched=score_batched,
        batch_size=batch_size,
        agreement=agree / len(rendered),
        sample_answers=tuple(answers[:3]),
    )
