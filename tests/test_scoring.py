"""The scoring rule: label tokens, label probabilities, and the batched scorer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from phishgate.core.errors import ConfigError
from phishgate.core.model import PreparedModel, load_causal_lm
from phishgate.core.render import render_email, training_example
from phishgate.core.scoring import (
    TransformersScorer,
    decide,
    label_probabilities,
    label_token_ids,
)
from phishgate.core.tasks import TASKS, Task, get_task

PHISHING = get_task("phishing")


@dataclass(frozen=True)
class Prompt:
    """Stands in for a RenderedEmail: the fields the scorer reads."""

    prompt_ids: tuple[int, ...]
    n_tokens: int
    truncated: bool
    task: Task


def _prompt(tokenizer: Any, text: str, task: Task = PHISHING) -> Prompt:
    conversation = [
        {"role": "system", "content": task.system_prompt},
        {"role": "user", "content": text},
    ]
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return Prompt(tuple(ids), len(ids), False, task)


EMAILS = [
    "From: it@corp.example\nSubject: Password expires today\n\nKeep your password: "
    "http://corp-login.example.net/reset " * 6,
    "From: mum@example.org\nSubject: Sunday\n\nLunch at noon?",
    "From: billing@paypa1.example\nSubject: Account suspended\n\nVerify now or lose access.",
    "From: list@lists.example.org\nSubject: [blinux] screen reader update\n\n"
    "The new release fixes the braille display driver. " * 12,
    "From: hr@corp.example\nSubject: Payslip\n\nYour payslip is attached (payslip.pdf.exe).",
]


@pytest.fixture(scope="module")
def causal_lm(prepared_model: PreparedModel) -> Any:
    return load_causal_lm(prepared_model.path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASKS))
def test_label_tokens_are_distinct_and_start_each_label(tokenizer: Any, name: str) -> None:
    task = get_task(name)
    ids = label_token_ids(tokenizer, task)
    assert len(ids) == len(task.labels) == len(set(ids))
    for label, token_id in zip(task.labels, ids, strict=True):
        assert label.startswith(tokenizer.decode([token_id]))
        # The answer follows "<|im_start|>assistant\n" without a leading space.
        assert tokenizer.encode(label, add_special_tokens=False)[0] == token_id


@pytest.mark.slow
def test_label_token_is_what_training_puts_after_the_rendered_prompt(
    tokenizer: Any, shared_data: Path
) -> None:
    raw = (shared_data / "phishing_pot" / "email" / "sample-10.eml").read_bytes()
    rendered = render_email(raw, PHISHING, tokenizer, 512)
    prompt = list(rendered.prompt_ids)
    for label, token_id in zip(PHISHING.labels, label_token_ids(tokenizer, PHISHING), strict=True):
        messages = training_example(rendered, label, PHISHING)["messages"]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(full[: len(prompt)]) == prompt
        assert full[len(prompt)] == token_id


@pytest.mark.slow
def test_labels_sharing_a_first_token_are_rejected(tokenizer: Any) -> None:
    task = Task(name="clash", labels=("phish", "phishing"), system_prompt="Answer phish.")
    with pytest.raises(ConfigError, match="share a first token"):
        label_token_ids(tokenizer, task)


def test_label_probabilities_is_a_softmax_over_the_label_logits_only() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    probabilities = label_probabilities(logits, (7, 3))
    assert probabilities.shape == (3, 2)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(dim=-1), torch.ones(3))
    expected = torch.softmax(logits.float()[:, [7, 3]], dim=-1)
    torch.testing.assert_close(probabilities, expected)
    with pytest.raises(ValueError):
        label_probabilities(logits[0], (7, 3))


def test_decide_applies_the_threshold_to_the_positive_label() -> None:
    score = decide([0.3, 0.7], PHISHING, 0.5, n_tokens=12, truncated=True)
    assert (score.label, score.score) == ("phishing", pytest.approx(0.7))
    assert score.scores == {"legitimate": pytest.approx(0.3), "phishing": pytest.approx(0.7)}
    assert (score.threshold, score.n_tokens, score.truncated) == (0.5, 12, True)
    assert decide([0.3, 0.7], PHISHING, 0.8, n_tokens=1, truncated=False).label == "legitimate"
    assert decide([0.2, 0.8], PHISHING, 0.8, n_tokens=1, truncated=False).label == "phishing"
    with pytest.raises(ConfigError):
        decide([0.3, 0.7], PHISHING, 1.5, n_tokens=1, truncated=False)


@pytest.mark.slow
def test_batched_scores_equal_single_and_full_forward_scores(
    causal_lm: Any, tokenizer: Any
) -> None:
    prompts = [_prompt(tokenizer, text) for text in EMAILS]
    assert len({p.n_tokens for p in prompts}) == len(prompts)  # padding really happens
    scorer = TransformersScorer(causal_lm, tokenizer, PHISHING, max_batch_size=3)

    batched = scorer.score_batch(prompts, threshold=0.6)

    assert [s.n_tokens for s in batched] == [p.n_tokens for p in prompts]
    for prompt, score in zip(prompts, batched, strict=True):
        assert 0.0 <= score.score <= 1.0
        assert sum(score.scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert score.threshold == 0.6
        assert score.label == ("phishing" if score.score >= 0.6 else "legitimate")
        (alone,) = scorer.score_batch([prompt], threshold=0.6)
        assert score.score == pytest.approx(alone.score, abs=1e-4)
        with torch.inference_mode():
            logits = causal_lm(input_ids=torch.tensor([prompt.prompt_ids])).logits
        reference = label_probabilities(logits[:, -1, :], scorer.label_ids)[0]
        assert score.score == pytest.approx(reference[1].item(), abs=1e-4)
        assert score.scores["legitimate"] == pytest.approx(reference[0].item(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_rendered_prompt_starts_with_the_tasks_prompt_prefix(
    tokenizer: Any, name: str
) -> None:
    from phishgate.core.scoring import continues, prompt_prefix_ids

    task = get_task(name)
    prefix = prompt_prefix_ids(tokenizer, task)
    assert len(prefix) > 40  # the chat template and the system prompt
    assert tokenizer.decode(prefix).rstrip().endswith("user")
    for text in EMAILS:
        raw = text.replace("\n\n", "\r\n\r\n", 1).replace("\n", "\r\n").encode()
        assert continues(render_email(raw, task, tokenizer, 256).prompt_ids, prefix)
    others = {prompt_prefix_ids(tokenizer, t) for t in TASKS.values() if t.name != name}
    assert prefix not in others


@pytest.mark.slow
def test_a_reused_prefix_gives_the_whole_prompts_logits(causal_lm: Any, tokenizer: Any) -> None:
    from phishgate.core.scoring import (
        continues,
        encode_prefix,
        last_position_logits,
        prompt_prefix_ids,
    )

    prompts = [_prompt(tokenizer, text).prompt_ids for text in EMAILS]
    prefix = encode_prefix(causal_lm, prompt_prefix_ids(tokenizer, PHISHING))
    assert all(continues(p, prefix.ids) for p in prompts)
    whole = last_position_logits(causal_lm, prompts, tokenizer.pad_token_id)
    # Rows with and without the prefix in one batch, of different lengths.
    mixed = [prefix if i % 2 == 0 else None for i in range(len(prompts))]
    reused = last_position_logits(causal_lm, prompts, tokenizer.pad_token_id, prefixes=mixed)
    torch.testing.assert_close(reused, whole, rtol=1e-4, atol=2e-4)
    for prompt, row in zip(prompts, whole, strict=True):
        with torch.inference_mode():
            alone = causal_lm(input_ids=torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(row, alone, rtol=1e-4, atol=2e-4)

    spam_prefix = encode_prefix(causal_lm, prompt_prefix_ids(tokenizer, get_task("spam")))
    with pytest.raises(ValueError, match="does not continue its prefix"):
        last_position_logits(causal_lm, prompts[:1], 0, prefixes=[spam_prefix])


@pytest.mark.slow
def test_scorer_needs_nothing_but_forward(causal_lm: Any, tokenizer: Any) -> None:
    class Wrapper(torch.nn.Module):
        """Like a PeftModel: a module whose forward delegates to the causal LM."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: Any) -> Any:
            return self.inner(**kwargs)

    prompts = [_prompt(tokenizer, text) for text in EMAILS[:2]]
    direct = TransformersScorer(causal_lm, tokenizer, PHISHING).score_batch(prompts)
    wrapped = TransformersScorer(Wrapper(causal_lm), tokenizer, PHISHING).score_batch(prompts)
    assert [s.score for s in wrapped] == pytest.approx([s.score for s in direct], abs=1e-6)


@pytest.mark.slow
def test_scorer_refuses_emails_rendered_for_another_task(tokenizer: Any) -> None:
    scorer = TransformersScorer(torch.nn.Linear(1, 1), tokenizer, PHISHING)
    with pytest.raises(ValueError, match="spam"):
        scorer.score_batch([_prompt(tokenizer, EMAILS[1], get_task("spam"))])
    assert scorer.score_batch([]) == []


def test_inference_dtype_setting() -> None:
    from phishgate.core.model import compute_dtype

    assert compute_dtype("float32") is torch.float32
    assert compute_dtype("bfloat16") is torch.bfloat16
    assert compute_dtype("auto") in (torch.float32, torch.bfloat16)


@pytest.mark.slow
def test_bfloat16_scores_stay_close_to_float32(
    causal_lm: Any, prepared_model: PreparedModel, tokenizer: Any
) -> None:
    prompts = [_prompt(tokenizer, text) for text in EMAILS]
    fp32 = TransformersScorer(causal_lm, tokenizer, PHISHING).score_batch(prompts)
    bf16_model = load_causal_lm(prepared_model.path, torch.bfloat16)
    bf16 = TransformersScorer(bf16_model, tokenizer, PHISHING).score_batch(prompts)
    for full, half in zip(fp32, bf16, strict=True):
        assert abs(full.score - half.score) < 0.05
