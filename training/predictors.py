"""Predictors the eval harness grades: the LLM (base model or base + adapter) and TF-IDF.

The LLM predictor re-encodes the stored rendering with the serving path's prompt encoding
and scores it with `phishgate.core.scoring.TransformersScorer`, the code that serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from phishgate.core.adapters import AdapterManifest
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import Task
from phishgate.training.baseline import TfidfBaseline
from phishgate.training.evaluate import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Progress = Callable[[int], None]
"""Called with the number of examples just scored."""

CHUNK = 64


class LLMPredictor:
    """P(positive label) from the causal LM at the answer position (one forward pass)."""

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        *,
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> None:
        from phishgate.core.scoring import TransformersScorer

        self.name = name
        self.task = task
        self.tokenizer = tokenizer
        self.scorer = TransformersScorer(model, tokenizer, task, max_batch_size=batch_size)
        self.progress = progress

    def predict(self, examples: Sequence[Example]) -> np.ndarray:
        from phishgate.core.render import rendered_from_messages

        scores: list[float] = []
        for start in range(0, len(examples), CHUNK):
            chunk = examples[start : start + CHUNK]
            rendered = [
                rendered_from_messages(e.prompt_messages, self.task, self.tokenizer) for e in chunk
            ]
            scores.extend(s.score for s in self.scorer.score_batch(rendered))
            if self.progress:
                self.progress(len(chunk))
        return np.array(scores, dtype=float)


@dataclass
class TfidfPredictor:
    """The classical baseline, fitted on the training split's rendered text."""

    baseline: TfidfBaseline
    task: Task
    name: str = "tfidf-logreg"

    @classmethod
    def fit(cls, train: Sequence[Example], task: Task, seed: int = 0) -> TfidfPredictor:
        y = [int(e.label == task.positive_label) for e in train]
        return cls(TfidfBaseline(seed).fit([e.user_text for e in train], y), task)

    def predict(self, examples: Sequence[Example]) -> np.ndarray:
        return self.baseline.predict_proba([e.user_text for e in examples])


def load_llm_predictor(
    settings: CoreSettings,
    task: Task,
    adapter: str | None = None,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> tuple[LLMPredictor, AdapterManifest | None]:
    """The base model (zero-shot) or base + adapter (a folder or a `models:/` URI); the
    adapter's manifest is returned too, for its threshold."""
    from phishgate.core.registry import load_scoring_model

    loaded = load_scoring_model(settings, adapter)
    predictor = LLMPredictor(
        loaded.name, loaded.model, loaded.tokenizer, task, batch_size=batch_size, progress=progress
    )
    return predictor, loaded.adapter.manifest if loaded.adapter else None
