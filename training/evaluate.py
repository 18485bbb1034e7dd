"""The eval harness: score labelled emails with a predictor and grade them.

Every predictor reads the same rendering of an email (the `messages` written by
`phishgate data prepare`, or raw mail rendered on the fly); the LLM predictor scores with
`phishgate.core.scoring`, the same code that serves. Graders are deterministic.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from phishgate.core.errors import ConfigError
from phishgate.core.tasks import Task
from phishgate.training.metrics import BinaryMetrics, best_f1_threshold, binary_metrics


@dataclass(frozen=True)
class Example:
    """One labelled, rendered email as stored in a split file."""

    id: str
    source: str
    label: str
    messages: tuple[dict[str, str], ...]
    lang: str = "unknown"
    n_tokens: int = 0
    sha256: str = ""
    """The raw message's SHA-256 as prepared (empty when unknown), to re-find its bytes."""

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> Example:
        """An Example from a split-file record (KeyError/TypeError/ValueError if malformed)."""
        return cls(
            id=str(row["id"]),
            source=str(row["source"]),
            label=str(row["label"]),
            messages=tuple(row["messages"]),
            lang=str(row.get("lang") or "unknown"),
            n_tokens=int(row.get("n_tokens") or 0),
            sha256=str(row.get("sha256") or ""),
        )

    @property
    def user_text(self) -> str:
        """The rendered email (the user message), what every predictor reads."""
        return next(m["content"] for m in self.messages if m["role"] == "user")

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """System and user messages: the conversation the model answers."""
        return [dict(m) for m in self.messages if m["role"] != "assistant"]


def sample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded sample of at most `limit` examples, stratified by label (all when None)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    chosen: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label]
        share = max(1, round(limit * len(group) / len(examples)))
        chosen.extend(rng.sample(group, min(share, len(group))))
    rng.shuffle(chosen)
    return chosen[:limit]


def load_examples(path: Path) -> list[Example]:
    """Read a split file (JSON lines); ConfigError naming the file and line on bad rows."""
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read split file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            examples.append(Example.from_record(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}:{number}: not a split record ({exc})") from None
    return examples


class Predictor(Protocol):
    """Anything that gives the positive label's probability for each example."""

    name: str

    def predict(self, examples: Sequence[Example]) -> np.ndarray: ...


@dataclass
class EvalReport:
    """What `phishgate eval` reports for one predictor on one set of examples."""

    predictor: str
    task: str
    split: str
    threshold: float
    threshold_source: str
    metrics: BinaryMetrics
    by_source: dict[str, BinaryMetrics]
    by_language: dict[str, BinaryMetrics]
    latency_ms_per_email: float
    mean_tokens: float
    plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "predictor": self.predictor,
            "task": self.task,
            "split": self.split,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "metrics": self.metrics.to_dict(),
            "by_source": {k: v.to_dict() for k, v in self.by_source.items()},
            "by_language": {k: v.to_dict() for k, v in self.by_language.items()},
            "latency_ms_per_email": _finite(self.latency_ms_per_email),
            "mean_tokens": _finite(self.mean_tokens),
            "plots": self.plots,
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def truth(examples: Sequence[Example], task: Task) -> np.ndarray:
    """1 where the example carries the task's positive label, else 0."""
    return np.array([int(e.label == task.positive_label) for e in examples], dtype=int)


def timed_predict(predictor: Predictor, examples: Sequence[Example]) -> tuple[np.ndarray, float]:
    """Scores and the wall time per email in milliseconds."""
    start = time.perf_counter()
    scores = np.asarray(predictor.predict(examples), dtype=float)
    elapsed = time.perf_counter() - start
    if scores.shape != (len(examples),):
        raise ValueError(f"{predictor.name} returned {scores.shape} scores for {len(examples)}")
    return scores, (1000.0 * elapsed / len(examples)) if examples else math.nan


def dev_threshold(predictor: Predictor, dev: Sequence[Example], task: Task) -> float:
    """The threshold that maximises F1 of `predictor` on `dev`."""
    dev_scores, _ = timed_predict(predictor, dev)
    return best_f1_threshold(truth(dev, task), dev_scores)


def grade(
    examples: Sequence[Example],
    scores: np.ndarray,
    task: Task,
    threshold: float,
) -> tuple[BinaryMetrics, dict[str, BinaryMetrics], dict[str, BinaryMetrics]]:
    """Overall metrics and breakdowns per source and per language at `threshold`."""
    y = truth(examples, task)
    overall = binary_metrics(y, scores, threshold)

    def breakdown(key: str) -> dict[str, BinaryMetrics]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, example in enumerate(examples):
            groups[getattr(example, key)].append(i)
        return {
            name: binary_metrics(y[idx], scores[idx], threshold)
            for name, idx in sorted(groups.items())
        }

    return overall, breakdown("source"), breakdown("lang")


def evaluate(
    predictor: Predictor,
    examples: Sequence[Example],
    task: Task,
    *,
    split: str,
    threshold: float | None = None,
    dev: Sequence[Example] | None = None,
) -> tuple[EvalReport, np.ndarray]:
    """Score and grade `examples`; return the report and the scores.

    The threshold is, in order: the one given (an adapter's own), the one that maximises
    F1 on `dev` when a dev set is given, else 0.5.
    """
    if not examples:
        raise ConfigError(f"nothing to evaluate in {split!r}: no examples")
    if threshold is not None:
        source = "given"
    elif dev:
        threshold, source = dev_threshold(predictor, dev, task), "best F1 on dev"
    else:
        threshold, source = 0.5, "default 0.5"
    scores, latency = timed_predict(predictor, examples)
    overall, by_source, by_language = grade(examples, scores, task, threshold)
    report = EvalReport(
        predictor=predictor.name,
        task=task.name,
        split=split,
        threshold=float(threshold),
        threshold_source=source,
        metrics=overall,
        by_source=by_source,
        by_language=by_language,
        latency_ms_per_email=latency,
        mean_tokens=float(np.mean([e.n_tokens for e in examples])),
    )
    return report, scores


def write_report(
    report: EvalReport, examples: Sequence[Example], scores: np.ndarray, task: Task, out_dir: Path
) -> Path:
    """Write report.json, scores.jsonl and the PNG plots under `out_dir`; return the JSON path."""
    from phishgate.training.plots import write_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(
        truth(examples, task),
        scores,
        report.threshold,
        (task.negative_label, task.positive_label),
        f"{report.predictor} on {report.split}",
        out_dir,
    )
    report.plots = {name: str(path) for name, path in plots.items()}
    with (out_dir / "scores.jsonl").open("w", encoding="utf-8") as handle:
        for example, score in zip(examples, scores, strict=True):
            row = {"id": example.id, "source": example.source, "label": example.label}
            handle.write(json.dumps({**row, "score": round(float(score), 6)}) + "\n")
    path = out_dir / "report.json"
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
