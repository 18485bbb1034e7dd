"""The promotion gate: does a challenger adapter replace the champion?

A pure decision over metrics measured on the same sets (the test split and the
leave-one-source-out holdout): the challenger must be at least as good on F1, within a
margin, and not worse calibrated (ECE), on every set both were measured on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from phishgate.core.settings import CoreSettings


@dataclass(frozen=True)
class Decision:
    promote: bool
    forced: bool = False
    reasons: list[str] = field(default_factory=list)


SetMetrics = Mapping[str, Mapping[str, float | None]]
"""{set name: {"f1": ..., "accuracy": ..., "ece": ..., "n_positive": ..., "n": ...}}"""


def quality_metric(metrics: Mapping[str, float | None]) -> str:
    """F1 where a set has both labels; accuracy on a one-label set (a held-out legitimate
    source, say), where F1 is 0 or undefined whatever the model does."""
    n, positives = metrics.get("n"), metrics.get("n_positive")
    if n is not None and positives is not None and positives in (0, n):
        return "accuracy"
    return "f1"


def decide_promotion(
    challenger: SetMetrics,
    champion: SetMetrics | None,
    *,
    f1_margin: float = 0.0,
    ece_margin: float = 0.01,
    force: bool = False,
) -> Decision:
    """Whether to move `champion` to the challenger, with the reason for each set.

    The quality metric of a set is F1, or accuracy on a one-label set (`quality_metric`);
    `f1_margin` is the allowed drop in it.
    """
    if champion is None:
        return Decision(True, force, ["no champion yet: the challenger becomes champion"])
    reasons: list[str] = []
    passed = True
    shared = sorted(set(challenger) & set(champion))
    if not shared:
        return Decision(force, force, ["challenger and champion share no evaluation set"])
    for name in shared:
        key = quality_metric(challenger[name])
        label = "F1" if key == "f1" else "accuracy"
        ch_q, cp_q = _value(challenger[name], key), _value(champion[name], key)
        ch_ece, cp_ece = _value(challenger[name], "ece"), _value(champion[name], "ece")
        if ch_q < cp_q - f1_margin:
            passed = False
            reasons.append(f"{name}: {label} {ch_q:.4f} < champion {cp_q:.4f} - margin {f1_margin}")
        else:
            reasons.append(f"{name}: {label} {ch_q:.4f} vs champion {cp_q:.4f}: ok")
        if ch_ece > cp_ece + ece_margin:
            passed = False
            reasons.append(
                f"{name}: ECE {ch_ece:.4f} > champion {cp_ece:.4f} + margin {ece_margin}"
            )
    if force and not passed:
        reasons.append("forced: promoted although the gate did not pass")
    return Decision(passed or force, force and not passed, reasons)


def _value(metrics: Mapping[str, float | None], key: str) -> float:
    value = metrics.get(key)
    return 0.0 if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class PromotionReport:
    decision: Decision
    challenger_version: str
    champion_version: str | None
    metrics: dict[str, dict[str, dict[str, float | None]]]
    """{"challenger" | "champion": {set name: {metric: value}}}"""


def promote(
    settings: CoreSettings,
    task_name: str,
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    f1_margin: float = 0.0,
    ece_margin: float = 0.01,
    force: bool = False,
) -> PromotionReport:
    """Evaluate `challenger` and `champion` on the same sets, decide, move the alias.

    The sets are the test split and, when prepared, the leave-one-source-out holdout,
    each scored at the adapter's own threshold. The decision is recorded as a tag on
    the challenger version (and the champion alias moved when it passes or is forced).
    """
    from phishgate.core.errors import ConfigError
    from phishgate.core.registry import (
        CHALLENGER,
        CHAMPION,
        list_versions,
        mlflow_client,
        model_name,
    )
    from phishgate.core.tasks import get_task
    from phishgate.training.evaluate import evaluate, load_examples, sample
    from phishgate.training.predictors import load_llm_predictor

    task = get_task(task_name)
    client = mlflow_client(settings)
    versions = {alias: v.version for v in list_versions(client, task.name) for alias in v.aliases}
    if CHALLENGER not in versions:
        raise ConfigError(f"{model_name(task.name)} has no @{CHALLENGER}; train one first")
    folder = data_dir or settings.dataset_dir(task.name)
    sets = {
        name: sample(load_examples(folder / f"{name}.jsonl"), limit, seed=0)
        for name in ("test", "holdout")
        if (folder / f"{name}.jsonl").is_file()
    }
    if not sets:
        raise ConfigError(f"no test split in {folder}; run `phishgate data prepare`")
    measured: dict[str, dict[str, dict[str, float | None]]] = {}
    for alias in (CHALLENGER, CHAMPION):
        if alias not in versions:
            continue
        uri = f"models:/{model_name(task.name)}@{alias}"
        predictor, manifest = load_llm_predictor(settings, task, uri)
        assert manifest is not None  # an adapter always has one
        measured[alias] = {}
        for name, examples in sets.items():
            report, _ = evaluate(
                predictor, examples, task, split=name, threshold=manifest.threshold
            )
            m = report.metrics
            measured[alias][name] = {
                "f1": m.f1,
                "accuracy": m.accuracy,
                "ece": m.ece,
                "n": m.n,
                "n_positive": m.n_positive,
            }
    decision = decide_promotion(
        measured[CHALLENGER],
        measured.get(CHAMPION),
        f1_margin=f1_margin,
        ece_margin=ece_margin,
        force=force,
    )
    name = model_name(task.name)
    challenger = versions[CHALLENGER]
    record = {
        "promoted": decision.promote,
        "forced": decision.forced,
        "against": versions.get(CHAMPION),
        "reasons": decision.reasons,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    client.set_model_version_tag(name, challenger, "promotion", json.dumps(record))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, challenger)
    return PromotionReport(decision, challenger, versions.get(CHAMPION), measured)
