"""The deterministic graders, checked against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from phishgate.training.metrics import (
    best_f1_threshold,
    binary_metrics,
    expected_calibration_error,
)


def test_metrics_match_a_hand_computed_confusion_matrix() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    s = [0.9, 0.8, 0.4, 0.7, 0.2, 0.1, 0.3, 0.6]
    m = binary_metrics(y, s, threshold=0.5)
    # predictions: 1 1 0 1 0 0 0 1 -> tp=3 fn=1 fp=1 tn=3
    assert m.confusion == [[3, 1], [1, 3]]
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(0.75)
    assert m.f1 == pytest.approx(f1_score(y, [int(v >= 0.5) for v in s]))
    assert m.accuracy == pytest.approx(0.75)
    assert m.roc_auc == pytest.approx(roc_auc_score(y, s))
    assert m.n == 8 and m.n_positive == 4


def test_single_class_gives_nan_for_curves_not_an_exception() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], threshold=0.5)
    assert math.isnan(m.roc_auc) and math.isnan(m.pr_auc) and math.isnan(m.recall)
    assert m.precision == 0.0  # one false positive
    assert m.to_dict()["roc_auc"] is None  # JSON-safe


def test_ece_is_zero_for_perfect_calibration_and_large_for_overconfidence() -> None:
    y = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(y, np.full(10, 0.8)) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0] * 10), np.full(10, 0.95)) == pytest.approx(0.95)


def test_best_f1_threshold_separates_separable_scores() -> None:
    y = [0, 0, 0, 1, 1]
    s = [0.1, 0.2, 0.35, 0.4, 0.9]
    threshold = best_f1_threshold(y, s)
    assert threshold == pytest.approx(0.375)  # the middle of the gap between the classes
    assert binary_metrics(y, s, threshold).f1 == 1.0
    # best F1 accepts down to 0.6 (the 0.3 positive is not worth two negatives above it)
    y, s = [0, 1, 0, 0, 1, 1], [0.1, 0.3, 0.5, 0.55, 0.6, 0.9]
    assert best_f1_threshold(y, s) == pytest.approx(0.575)
    # the lowest score accepted: nothing below to take the middle with
    assert best_f1_threshold([1, 0, 1], [0.2, 0.9, 0.95]) == pytest.approx(0.2)
    assert best_f1_threshold([1, 1], [0.2, 0.3]) == 0.5
