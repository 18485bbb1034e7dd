"""The promotion gate as a pure function."""

from __future__ import annotations

from phishgate.training.promotion import decide_promotion

CHAMPION = {"test": {"f1": 0.95, "ece": 0.05}, "holdout": {"f1": 0.80, "ece": 0.10}}


def test_first_adapter_becomes_champion() -> None:
    assert decide_promotion(CHAMPION, None).promote


def test_better_or_equal_everywhere_promotes() -> None:
    better = {"test": {"f1": 0.96, "ece": 0.04}, "holdout": {"f1": 0.80, "ece": 0.10}}
    decision = decide_promotion(better, CHAMPION)
    assert decision.promote and not decision.forced


def test_worse_f1_on_the_holdout_blocks_unless_within_margin() -> None:
    worse = {"test": {"f1": 0.97, "ece": 0.04}, "holdout": {"f1": 0.78, "ece": 0.10}}
    blocked = decide_promotion(worse, CHAMPION)
    assert not blocked.promote
    assert any("holdout: F1 0.7800 < champion" in r for r in blocked.reasons)
    assert decide_promotion(worse, CHAMPION, f1_margin=0.03).promote


def test_worse_calibration_blocks() -> None:
    overconfident = {"test": {"f1": 0.99, "ece": 0.20}, "holdout": {"f1": 0.9, "ece": 0.1}}
    decision = decide_promotion(overconfident, CHAMPION)
    assert not decision.promote and any("ECE" in r for r in decision.reasons)


def test_force_promotes_and_is_recorded_as_forced() -> None:
    worse = {"test": {"f1": 0.5, "ece": 0.3}}
    decision = decide_promotion(worse, CHAMPION, force=True)
    assert decision.promote and decision.forced
    assert decision.reasons[-1].startswith("forced")
    # Forcing what would pass anyway is not "forced".
    assert not decide_promotion(CHAMPION, CHAMPION, force=True).forced


def test_missing_metrics_count_as_zero_f1() -> None:
    assert not decide_promotion({"test": {"f1": None, "ece": 0.0}}, CHAMPION).promote


def test_one_label_sets_are_judged_by_accuracy() -> None:
    ham_only = {"n": 100, "n_positive": 0}
    champion = {"holdout": {"f1": 0.0, "accuracy": 0.96, "ece": 0.05, **ham_only}}
    more_false_positives = {"holdout": {"f1": 0.0, "accuracy": 0.90, "ece": 0.05, **ham_only}}
    decision = decide_promotion(more_false_positives, champion)
    assert not decision.promote
    assert decision.reasons[0].startswith("holdout: accuracy 0.9000 < champion 0.9600")
    fewer = {"holdout": {"f1": 0.0, "accuracy": 0.99, "ece": 0.05, **ham_only}}
    assert decide_promotion(fewer, champion).promote
