"""The scoring rule (DESIGN invariant 3), shared by the eval harness and every engine.

The model's answer starts with a label word. The score of an email is the softmax over the
label words' first-token logits at the answer position, the position right after the chat
template's generation prompt: one forward pass, logits of the last position only, no
sampling and no parsing of generated text.

Every prompt of a task starts with the same tokens (the chat template and the system
prompt, ~70 of ~250 at a 256-token budget). Their key/value states depend on nothing else,
so they are computed once per model (`encode_prefix`) and each forward pass runs the rest
of each prompt only (`last_position_logits`); the scores are those of the whole prompt.
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


def prompt_prefix_ids(tokenizer: PreTrainedTokenizerBase, task: Task) -> tuple[int, ...]:
    """The tokens every prompt of `task` starts with: the chat template up to the email.

    Found as the common start of two templated probe conversations, so a tokenizer that
    merges the template's last token with the email's first one cannot make it wrong.
    """
    first, second = (
        _template(
            tokenizer,
            [{"role": "system", "content": task.system_prompt}, {"role": "user", "content": u}],
            add_generation_prompt=True,
        )
        for u in (_PROBE_EMAIL, "Subject: other\n\n" + _PROBE_EMAIL[::-1])
    )
    n = 0
    while n < min(len(first), len(second)) and first[n] == second[n]:
        n += 1
    return tuple(first[:n])


@dataclass(frozen=True)
class PromptPrefix:
    """The key/value states of `ids` in one model (one adapter): per decoder layer, keys
    and values shaped [1, kv_heads, len(ids), head_dim]."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def continues(prompt: Sequence[int], prefix: Sequence[int]) -> bool:
    """Whether `prompt` is `prefix` followed by at least one more token."""
    return len(prompt) > len(prefix) and tuple(prompt[: len(prefix)]) == tuple(prefix)


def encode_prefix(
    model: torch.nn.Module, ids: Sequence[int], *, adapter_name: str | None = None
) -> PromptPrefix:
    """The PromptPrefix of `ids` under `model` (with PEFT, under adapter `adapter_name`)."""
    device = next(model.parameters()).device
    kwargs = {} if adapter_name is None else {"adapter_names": [adapter_name]}
    with torch.inference_mode():
        cache = model(
            input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device),
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        ).past_key_values
    return PromptPrefix(tuple(ids), tuple((lay.keys, lay.values) for lay in cache.layers))


def last_position_logits(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    *,
    prefixes: Sequence[PromptPrefix | None] | None = None,
    adapter_names: Sequence[str] | None = None,
) -> torch.Tensor:
    """[batch, vocab] logits at each prompt's last token, from one forward pass.

    `prefixes[i]`, when given, must be a proper start of `prompts[i]` computed under the
    row's adapter (`adapter_names[i]` for PEFT mixed batches): its states are reused and
    only the rest of the prompt runs. Rows are laid out [padding | prefix | padding | rest]
    with real-token positions, so each row scores as it would alone.
    """
    rows = list(prefixes) if prefixes is not None else [None] * len(prompts)
    if len(rows) != len(prompts):
        raise ValueError(f"{len(rows)} prefixes for {len(prompts)} prompts")
    if any(
        p is not None and not continues(prompt, p.ids)
        for p, prompt in zip(rows, prompts, strict=True)
    ):
        raise ValueError("a prompt does not continue its prefix")
    lengths = [len(p.ids) if p is not None else 0 for p in rows]
    input_ids, attention_mask, position_ids = left_pad(
        [prompt[n:] for prompt, n in zip(prompts, lengths, strict=True)], pad_id
    )
    device = next(model.parameters()).device
    kwargs: dict[str, object] = {}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
    width = max(lengths)
    if width:
        kwargs["past_key_values"] = _stacked_cache(model, rows, width, device)
        kwargs["use_cache"] = True
        prefix_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, n in enumerate(lengths):
            prefix_mask[row, width - n :] = 1
        attention_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        position_ids = position_ids + torch.tensor(lengths).unsqueeze(1)
    else:
        kwargs["use_cache"] = False
    with torch.inference_mode():
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=1,
            **kwargs,
        )
    return output.logits[:, -1, :]


def _stacked_cache(
    model: torch.nn.Module,
    rows: Sequence[PromptPrefix | None],
    width: int,
    device: torch.device,
) -> object:
    """A DynamicCache holding each row's prefix states, left-padded with zeros to `width`."""
    from transformers import DynamicCache

    template = next(p for p in rows if p is not None)
    layers = []
    for layer, states in enumerate(template.layers):
        pair = []
        for kind, like in enumerate(states):  # keys, then values
            batch = like.new_zeros((len(rows), like.shape[1], width, like.shape[3]))
            for row, prefix in enumerate(rows):
                if prefix is not None:
                    own = prefix.layers[layer][kind]
                    batch[row, :, width - own.shape[2] :] = own[0]
            pair.append(batch.to(device))
        layers.append((pair[0], pair[1]))
    config = getattr(model, "config", None)
    return DynamicCache(ddp_cache_data=layers, config=config)


class TransformersScorer:
    """Scores rendered emails with a causal LM (a transformers model or a PEFT wrapper).

    Only the model's forward is used (`last_position_logits`). The task's prompt prefix is
    encoded on first use and reused after, so a scorer is for fixed weights: make a new
    one after training steps.
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
        self.prefix_ids = prompt_prefix_ids(tokenizer, task)
        self._prefix: PromptPrefix | None = None

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
        if self._prefix is None:
            self._prefix = encode_prefix(self.model, self.prefix_ids)
        prefixes = [self._prefix if continues(p, self._prefix.ids) else None for p in prompts]
        logits = last_position_logits(self.model, prompts, self.pad_id, prefixes=prefixes)
        return label_probabilities(logits, self.label_ids).cpu()


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
