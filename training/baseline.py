"""The classical baseline: TF-IDF word and character n-grams with logistic regression.

It reads the same rendered text the model reads (the user message of the one rendering),
so the comparison with the LLM is about the classifier, not the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline


def tfidf_logreg(seed: int = 0) -> Pipeline:
    """An unfitted pipeline: word 1-2-grams + char 3-5-grams, balanced logistic regression."""
    features = FeatureUnion(
        [
            (
                "word",
                TfidfVectorizer(
                    ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True
                ),
            ),
            (
                "char",
                TfidfVectorizer(
                    analyzer="char_wb",
                    ngram_range=(3, 5),
                    min_df=2,
                    max_features=300_000,
                    sublinear_tf=True,
                ),
            ),
        ]
    )
    classifier = LogisticRegression(
        C=10.0, max_iter=2000, class_weight="balanced", random_state=seed
    )
    return Pipeline([("features", features), ("classifier", classifier)])


class TfidfBaseline:
    """Binary TF-IDF baseline: `fit` on texts and 0/1 labels, `predict_proba` of label 1."""

    def __init__(self, seed: int = 0) -> None:
        self.pipeline = tfidf_logreg(seed)

    def fit(self, texts: Sequence[str], y: Sequence[int]) -> TfidfBaseline:
        if len(set(y)) < 2:
            raise ValueError("the baseline needs both labels in its training texts")
        self.pipeline.fit(list(texts), list(y))
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        probabilities: np.ndarray = self.pipeline.predict_proba(list(texts))[:, 1]
        return probabilities
