"""The scoring rule (DESIGN invariant 3), shared by the eval harness and every engine.

The model's answer starts with a label word. The score of an email is the softmax over the
label words' first-token logits at the answer position, the position right after the chat
template's generation prompt: one forward pass, logits of the last position only, no
sampling and no parsing of generated text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from phishgate.core.errors import ConfigError
from phishgate.core.tasks import Task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Stands in for the user turn when finding how the answer tokenises; any text will do.
_PROBE_EMAIL = "From: a@example.org\nSubject: probe\n\nHello."


class Rendered(Protocol):
    """What scoring reads of a `phishgate.core.render.RenderedEmail`."""

    @property
    def prompt_ids(self) -> tuple[int, ...]: ...

    @property
    def n_tokens(self) -> int: ...

    @property
    def truncated(self) -> bool: ...

    @property
    def task(self) -> Task: ...


@dataclass(frozen=True)
class Score:
    """The verdict on one email: `score` is the probability of the task's positive label."""

    label: str
    score: float
    scores: dict[str, float]
    threshold: float
    n_tokens: int
    truncated: bool


def label_token_ids(tokenizer: PreTrainedTokenizerBase, task: Task) -> tuple[int, ...]:
    """The first token of each of `task.labels` as the model emits it at the answer position.

    Found by templating a conversation whose assistant turn is the label word, exactly as
    training does, and reading the token right after the generation prompt. ConfigError if
    the chat template does not extend the generation prompt with the answer, or if two
    labels share their first token.
    """
    conversation = [
        {"role": "system", "content": task.system_prompt},
        {"role": "user", "content": _PROBE_EMAIL},
    ]
    prompt = _template(tokenizer, conversation, add_generation_prompt=True)
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    for label in task.labels:
        answer = [*conversation, {"role": "assistant", "content": label}]
        full = _template(tokenizer, answer, add_generation_prompt=False)
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise ConfigError(
                "the tokenizer's chat template does not continue the generation prompt "
                f"with the assistant's answer; cannot find the answer token of {label!r}"
            )
        first = full[len(prompt)]
        if first in special:
            raise ConfigError(f"label {label!r} starts with a special token")
        ids.append(first)
    if len(set(ids)) != len(ids):
        pieces = ", ".join(
            f"{label!r}->{tokenizer.convert_ids_to_tokens(i)!r}"
            for label, i in zip(task.labels, ids, strict=True)
        )
        raise ConfigError(f"labels of task {task.name!r} share a first token: {pieces}")
    return tuple(ids)


def label_probabilities(last_logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """[batch, vocab] logits -> [batch, len(token_ids)] float32 softmax over those ids only."""
    if last_logits.dim() != 2:
        raise ValueError(f"expected [batch, vocab] logits, got shape {tuple(last_logits.shape)}")
    picked = last_logits[:, list(token_ids)].float()
    return torch.softmax(picked, dim=-1)


def decide(
    probabilities: Sequence[float],
    task: Task,
    threshold: float,
    *,
    n_tokens: int,
    truncated: bool,
) -> Score:
    """The Score for label probabilities ordered as `task.labels`.

    The label is the positive one when its probability reaches `threshold`, else the
    negative one.
    """
    if len(probabilities) != len(task.labels):
        raise ValueError(f"{len(probabilities)} probabilities for {len(task.labels)} labels")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold {threshold} is outside [0, 1]")
    scores = {label: float(p) for label, p in zip(task.labels, probabilities, strict=True)}
    score = scores[task.positive_label]
    return Score(
        label=task.positive_label if score >= threshold else task.negative_label,
        score=score,
        scores=scores,
        threshold=threshold,
        n_tokens=n_tokens,
        truncated=truncated,
    )


class TransformersScorer:
    """Scores rendered emails with a causal LM (a transformers model or a PEFT wrapper).

    Only the model's forward is used: input_ids, attention_mask, position_ids and
    logits_to_keep=1.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        *,
        max_batch_size: int = 8,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model
        self.task = task
        self.max_batch_size = max_batch_size
        self.label_ids = label_token_ids(tokenizer, task)
        pad = tokenizer.pad_token_id
        # Padding sits under a zero attention mask, so any id will do when none is set.
        self.pad_id: int = pad if pad is not None else 0

    def score_batch(self, rendered: Sequence[Rendered], threshold: float = 0.5) -> list[Score]:
        """One Score per email, in input order.

        Emails are scored in length-sorted micro-batches of at most `max_batch_size`, left
        padded; padding does not change a score.
        """
        for item in rendered:
            if item.task.name != self.task.name:
                raise ValueError(
                    f"email rendered for task {item.task.name!r}, not {self.task.name!r}"
                )
            if not item.prompt_ids:
                raise ValueError("empty prompt")
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i].prompt_ids))
        probabilities: dict[int, list[float]] = {}
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            rows = self._label_probabilities([rendered[i].prompt_ids for i in chunk])
            probabilities.update(zip(chunk, rows.tolist(), strict=True))
        return [
            decide(
                probabilities[i],
                self.task,
                threshold,
                n_tokens=item.n_tokens,
                truncated=item.truncated,
            )
            for i, item in enumerate(rendered)
        ]

    def _label_probabilities(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """One left-padded forward pass; label probabilities at each prompt's last token."""
        input_ids, attention_mask, position_ids = left_pad(prompts, self.pad_id)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=1,
                use_cache=False,
            )
        return label_probabilities(output.logits[:, -1, :], self.label_ids).cpu()


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of left-padded `sequences`.

    Every sequence ends at the last column, so the answer position is -1 for all rows.
    Positions count real tokens only, so a padded sequence sees the positions it would
    alone (transformers' Llama otherwise numbers positions across the padding).
    """
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
        attention_mask[row, width - len(sequence) :] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _template(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        conversation,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    return [int(i) for i in ids]
