"""One evaluation run: predictors x splits of a prepared dataset, a robustness suite, a summary.

    phishgate eval [--task phishing] [--predictor zero-shot --predictor tfidf] [--limit 300]
    phishgate eval --predictor adapter --adapter models:/phishgate-phishing@champion
    phishgate eval --mail ~/Maildir/.Junk --label phishing

Writes under `out_dir`:
- `<predictor>/<split>/` per pair: `report.json`, `scores.jsonl`, plots (`write_report`);
- `robustness_scores.jsonl`: each predictor's score of each edited and unedited message;
- `summary.json` and `summary.md`: every pair's metrics, the holdout per source, robustness.

Thresholds: an adapter's own (its manifest); the zero-shot model and TF-IDF take the one
that maximises F1 on dev (sampled like the other splits). TF-IDF is fitted on all of train.
The robustness suite re-reads the raw bytes of the test split's phishing messages from the
sources recorded in `card.json`, applies each edit of `phishgate.training.robustness.EDITS`,
renders the edited message with the one renderer and scores it with each predictor.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from phishgate.core.errors import ConfigError
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import Task, get_task
from phishgate.training.evaluate import (
    EvalReport,
    Example,
    Predictor,
    dev_threshold,
    evaluate,
    load_examples,
    sample,
    write_report,
)
from phishgate.training.robustness import EDITS
from phishgate.training.sources import (
    DataConfig,
    DataSourceError,
    RawMessage,
    Skipped,
    SourceConfig,
    read_source,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREDICTORS = ("zero-shot", "tfidf", "adapter")
"""Predictor choices; each is also the folder name of its reports."""
OPTIONAL_SPLITS = ("holdout",)
"""Splits skipped (and noted in the summary) when their file is absent."""
MAIL_SPLIT = "mail"

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class SplitSample:
    """How many examples of a split were evaluated, of how many."""

    used: int
    total: int

    @property
    def sampled(self) -> bool:
        return self.used < self.total


@dataclass(frozen=True)
class PairResult:
    """One predictor graded on one split."""

    predictor: str
    split: str
    report: EvalReport
    path: Path


@dataclass(frozen=True)
class EditOutcome:
    """One edit scored by one predictor, on the messages the edit applied to.

    `recall_unedited` is the recall of the same messages before the edit; `unrenderable`
    counts edited messages the renderer rejected.
    """

    edit: str
    predictor: str
    applied: int
    not_applicable: int
    unrenderable: int
    recall_unedited: float
    recall_edited: float
    mean_score_unedited: float
    mean_score_edited: float

    def to_dict(self) -> dict[str, Any]:
        return {k: _num(v) for k, v in self.__dict__.items()}


@dataclass
class RobustnessSet:
    """The rendered messages of the suite: unedited and, per edit, the edited ones."""

    available: int
    sampled: int
    unedited: list[Example]
    edited: dict[str, list[Example]]
    not_applicable: dict[str, int]
    unrenderable: dict[str, int]
    missing: dict[str, str]
    """Sampled ids whose raw bytes could not be used, with the reason."""
    stale: int
    """Unedited messages whose fresh rendering differs from the stored one."""


@dataclass
class RobustnessResult:
    """The suite's counts and each predictor's outcome per edit."""

    available: int
    sampled: int
    found: int
    missing: dict[str, str]
    stale: int
    thresholds: dict[str, float]
    outcomes: list[EditOutcome]

    def to_dict(self) -> dict[str, Any]:
        return {
            "phishing_in_test": self.available,
            "sampled": self.sampled,
            "raw_found": self.found,
            "raw_missing": len(self.missing),
            "raw_missing_examples": dict(list(self.missing.items())[:10]),
            "stale_renderings": self.stale,
            "thresholds": self.thresholds,
            "edits": [o.to_dict() for o in self.outcomes],
        }


@dataclass
class EvalSummary:
    """What one `run_eval` produced; `summary.json` is `to_dict()`, `summary.md` `markdown()`."""

    task: str
    data_dir: Path
    out_dir: Path
    seed: int
    limit: int | None
    samples: dict[str, SplitSample]
    skipped_splits: list[str]
    predictors: dict[str, dict[str, Any]]
    results: list[PairResult]
    robustness: RobustnessResult | None
    seconds: float = 0.0
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def result(self, predictor: str, split: str) -> PairResult:
        """The result of `predictor` on `split`; KeyError if that pair was not run."""
        for r in self.results:
            if (r.predictor, r.split) == (predictor, split):
                return r
        raise KeyError((predictor, split))

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "created_at": self.created_at,
            "data_dir": str(self.data_dir),
            "out_dir": str(self.out_dir),
            "seed": self.seed,
            "limit": self.limit,
            "samples": {
                split: {"used": s.used, "total": s.total, "sampled": s.sampled}
                for split, s in self.samples.items()
            },
            "skipped_splits": self.skipped_splits,
            "predictors": self.predictors,
            "results": [
                {
                    **{k: v for k, v in r.report.to_dict().items() if k != "plots"},
                    "predictor": r.predictor,
                    "name": r.report.predictor,
                    "report": str(r.path),
                }
                for r in self.results
            ],
            "robustness": self.robustness.to_dict() if self.robustness else None,
            "seconds": round(self.seconds, 1),
        }

    def markdown(self) -> str:
        lines = [f"# Evaluation: {self.task}", ""]
        lines.append(f"Data `{self.data_dir}`, {self.created_at}, {self.seconds:.0f} s.")
        lines.extend(f"- {line}" for line in self._sample_notes())
        lines.extend(
            f"- `{slug}`: {p['name']}, threshold {p['threshold']:.4f} ({p['threshold_source']})"
            for slug, p in self.predictors.items()
        )
        lines += ["", "## Results", "", *self._results_table()]
        for split in (*OPTIONAL_SPLITS, MAIL_SPLIT):
            if any(r.split == split for r in self.results):
                lines += ["", f"## {split} by source", "", *self._by_source_table(split)]
        if self.robustness:
            lines += ["", "## Robustness (phishing messages of test)", ""]
            lines += self._robustness_lines(self.robustness)
        return "\n".join(lines) + "\n"

    def _sample_notes(self) -> Iterator[str]:
        for split, s in self.samples.items():
            if s.sampled:
                yield (
                    f"{split}: a sample of {s.used} of {s.total} (stratified by label, "
                    f"seed {self.seed}, limit {self.limit})"
                )
            else:
                yield f"{split}: all {s.total}"
        for split in self.skipped_splits:
            yield f"{split}: no {split}.jsonl, not evaluated"

    def _results_table(self) -> list[str]:
        head = "| predictor | split | n | F1 | precision | recall | ROC-AUC | PR-AUC | ECE "
        rows = [head + "| threshold | ms/email |", "|" + "---|" * 11]
        for r in self.results:
            m = r.report.metrics
            values = (m.f1, m.precision, m.recall, m.roc_auc, m.pr_auc, m.ece, m.threshold)
            cells = [r.predictor, r.split, str(m.n), *(_fmt(v) for v in values)]
            cells.append(_fmt(r.report.latency_ms_per_email, 1))
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    def _by_source_table(self, split: str) -> list[str]:
        rows = ["| predictor | source | n | positive | recall | accuracy |", "|" + "---|" * 6]
        for r in self.results:
            if r.split != split:
                continue
            for source, m in r.report.by_source.items():
                cells = [r.predictor, source, str(m.n), str(m.n_positive)]
                rows.append("| " + " | ".join([*cells, _fmt(m.recall), _fmt(m.accuracy)]) + " |")
        return rows

    @staticmethod
    def _robustness_lines(result: RobustnessResult) -> list[str]:
        lines = [
            f"{result.sampled} of {result.available} phishing messages of test sampled; "
            f"raw bytes found for {result.found}"
            + (f", {len(result.missing)} missing" if result.missing else "")
            + (
                f"; {result.stale} render differently now than when prepared"
                if result.stale
                else ""
            )
            + ". Recall at each predictor's threshold, on the messages each edit applied to.",
            "",
            "| edit | predictor | applied | not applicable | unrenderable | recall unedited "
            "| recall edited | Δ recall | mean score unedited → edited |",
            "|" + "---|" * 9,
        ]
        for o in result.outcomes:
            delta = o.recall_edited - o.recall_unedited
            cells = [o.edit, o.predictor, str(o.applied), str(o.not_applicable)]
            cells += [str(o.unrenderable), _fmt(o.recall_unedited), _fmt(o.recall_edited)]
            cells += [_fmt(delta, signed=True)]
            cells += [f"{_fmt(o.mean_score_unedited)} → {_fmt(o.mean_score_edited)}"]
            lines.append("| " + " | ".join(cells) + " |")
        return lines


def run_eval(
    settings: CoreSettings,
    task: str,
    *,
    data_dir: Path,
    out_dir: Path,
    splits: Sequence[str] = ("test", "holdout"),
    predictors: Sequence[str] = ("zero-shot", "tfidf"),
    adapter: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    robustness: bool = True,
    robustness_limit: int | None = None,
    mail: Sequence[Example] = (),
    progress: Say = _quiet,
) -> EvalSummary:
    """Grade each predictor on each split file of `data_dir` (and on `mail`), write reports.

    `limit` evaluates a seeded sample per split, stratified by label (dev included);
    `robustness_limit` (default `limit`) caps the suite's phishing messages. Every input
    is checked before any scoring: ConfigError for an unknown predictor, an `adapter`
    predictor without an adapter (or an adapter without that predictor), a missing split
    file (a missing holdout is skipped), a missing dev/train/card file that a chosen
    predictor or the suite needs.
    """
    started = time.perf_counter()
    data_dir, out_dir = data_dir.resolve(), out_dir.resolve()
    chosen_task = get_task(task)
    chosen = _check_predictors(predictors, adapter)
    tables = _load_splits(data_dir, splits)
    skipped = [s for s in splits if s not in tables]
    if not tables and not mail:
        raise ConfigError(f"nothing to evaluate: none of {', '.join(splits)} in {data_dir}")
    needs_dev = any(p != "adapter" for p in chosen)
    dev = load_examples(_split_file(data_dir, "dev")) if needs_dev else []
    train = load_examples(_split_file(data_dir, "train")) if "tfidf" in chosen else []
    evaluated = {name: sample(rows, limit, seed) for name, rows in tables.items()}
    samples = {name: SplitSample(len(evaluated[name]), len(rows)) for name, rows in tables.items()}
    if mail:
        evaluated[MAIL_SPLIT] = list(mail)
        samples[MAIL_SPLIT] = SplitSample(len(mail), len(mail))
    if dev:
        total = len(dev)
        dev = sample(dev, limit, seed)
        samples["dev"] = SplitSample(len(dev), total)

    suite: RobustnessSet | None = None
    if robustness:
        progress("robustness: reading raw messages and applying edits")
        suite = build_robustness_set(
            settings,
            chosen_task,
            data_dir,
            limit=robustness_limit if robustness_limit is not None else limit,
            seed=seed,
        )
        progress(f"robustness: {len(suite.unedited)} messages, {len(EDITS)} edits")

    results: list[PairResult] = []
    described: dict[str, dict[str, Any]] = {}
    outcomes: list[EditOutcome] = []
    thresholds: dict[str, float] = {}
    scores_file = out_dir / "robustness_scores.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_file.unlink(missing_ok=True)
    for slug in chosen:
        progress(f"{slug}: loading")
        predictor, threshold = _build(settings, chosen_task, slug, adapter, train, progress)
        if threshold is None:
            progress(f"{slug}: choosing the threshold on dev ({len(dev)})")
            threshold, source = dev_threshold(predictor, dev, chosen_task), "best F1 on dev"
        else:
            source = "adapter manifest"
        described[slug] = {
            "name": predictor.name,
            "threshold": threshold,
            "threshold_source": source,
        }
        for split, rows in evaluated.items():
            progress(f"{slug}: scoring {split} ({len(rows)})")
            report, scores = evaluate(
                predictor, rows, chosen_task, split=split, threshold=threshold
            )
            report.threshold_source = source
            path = write_report(report, rows, scores, chosen_task, out_dir / slug / split)
            results.append(PairResult(slug, split, report, path))
            progress(f"{slug}: {split} F1 {_fmt(report.metrics.f1)} -> {path}")
        if suite is not None:
            progress(f"{slug}: robustness suite")
            thresholds[slug] = threshold
            outcomes += score_robustness(predictor, slug, threshold, suite, scores_file)

    summary = EvalSummary(
        task=chosen_task.name,
        data_dir=data_dir,
        out_dir=out_dir,
        seed=seed,
        limit=limit,
        samples=samples,
        skipped_splits=skipped,
        predictors=described,
        results=results,
        robustness=(
            RobustnessResult(
                available=suite.available,
                sampled=suite.sampled,
                found=len(suite.unedited),
                missing=suite.missing,
                stale=suite.stale,
                thresholds=thresholds,
                outcomes=outcomes,
            )
            if suite is not None
            else None
        ),
    )
    summary.seconds = time.perf_counter() - started
    (out_dir / "summary.json").write_text(
        json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "summary.md").write_text(summary.markdown(), encoding="utf-8")
    progress(f"summary -> {out_dir / 'summary.md'}")
    return summary


def examples_from_mail(
    path_or_glob: str | Path,
    label: str | None,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
) -> tuple[list[Example], list[Skipped]]:
    """Every message under an .eml file/folder, maildir, mbox or CSV (a glob allowed),
    rendered by the one renderer and labelled `label` (a CSV may carry its own labels).

    Messages the readers or the renderer reject come back as Skipped. ConfigError for a
    label outside the task; DataSourceError (a ConfigError) when nothing matches.
    """
    if label is not None and label not in task.labels:
        raise ConfigError(f"label {label!r} is not one of {', '.join(task.labels)}")
    source = SourceConfig(name=MAIL_SPLIT, path=str(path_or_glob), format="auto", label=label)
    examples: list[Example] = []
    skipped: list[Skipped] = []
    for entry in read_source(source, Path.cwd(), task.labels):
        result = (
            entry if isinstance(entry, Skipped) else _render(entry, task, tokenizer, max_tokens)
        )
        if isinstance(result, Skipped):
            skipped.append(result)
        else:
            examples.append(result)
    return examples, skipped


def build_robustness_set(
    settings: CoreSettings,
    task: Task,
    data_dir: Path,
    *,
    limit: int | None,
    seed: int,
) -> RobustnessSet:
    """Sample the test split's positive examples, re-read their raw bytes, render them
    unedited and after each edit. ConfigError if test.jsonl or card.json is missing."""
    from phishgate.core.model import load_tokenizer, resolve_base_model

    positives = [
        e for e in load_examples(_split_file(data_dir, "test")) if e.label == task.positive_label
    ]
    chosen = sample(positives, limit, seed)
    raw, missing = find_raw(data_dir, chosen)
    tokenizer = load_tokenizer(resolve_base_model(settings).path)
    budget = settings.max_input_tokens
    suite = RobustnessSet(len(positives), len(chosen), [], {}, {}, {}, missing, 0)
    originals: list[RawMessage] = []
    for example in chosen:
        if example.id not in raw:
            continue
        message = RawMessage(example.id, example.source, example.label, raw[example.id], Path())
        rendered = _render(message, task, tokenizer, budget)
        if isinstance(rendered, Skipped):
            suite.missing[example.id] = rendered.reason
            continue
        suite.stale += rendered.user_text != example.user_text
        suite.unedited.append(rendered)
        originals.append(message)
    for name, edit in EDITS.items():
        suite.edited[name] = []
        suite.not_applicable[name] = suite.unrenderable[name] = 0
        for message in originals:
            data = edit(message.raw)
            if data is None:
                suite.not_applicable[name] += 1
                continue
            edited = RawMessage(message.id, message.source, message.label, data, Path())
            rendered = _render(edited, task, tokenizer, budget)
            if isinstance(rendered, Skipped):
                suite.unrenderable[name] += 1
            else:
                suite.edited[name].append(rendered)
    return suite


def score_robustness(
    predictor: Predictor,
    slug: str,
    threshold: float,
    suite: RobustnessSet,
    scores_file: Path | None = None,
) -> list[EditOutcome]:
    """Recall of each edit's messages before and after the edit, at `threshold`.

    Scores every unedited and edited message in one `predict` call; appends one JSON line
    per score (`predictor`, `id`, `edit`, `score`; edit `none` = unedited) to `scores_file`.
    """
    batch = [*suite.unedited, *(e for name in EDITS for e in suite.edited[name])]
    scores = predictor.predict(batch) if batch else np.zeros(0)
    base = dict(zip((e.id for e in suite.unedited), scores[: len(suite.unedited)], strict=True))
    offset = len(suite.unedited)
    outcomes = []
    lines = [
        _score_line(slug, e.id, "none", s) for e, s in zip(suite.unedited, scores, strict=False)
    ]
    for name in EDITS:
        edited = suite.edited[name]
        after = scores[offset : offset + len(edited)]
        offset += len(edited)
        before = np.array([base[e.id] for e in edited], dtype=float)
        lines += [_score_line(slug, e.id, name, s) for e, s in zip(edited, after, strict=True)]
        outcomes.append(
            EditOutcome(
                edit=name,
                predictor=slug,
                applied=len(edited),
                not_applicable=suite.not_applicable[name],
                unrenderable=suite.unrenderable[name],
                recall_unedited=_mean(before >= threshold),
                recall_edited=_mean(after >= threshold),
                mean_score_unedited=_mean(before),
                mean_score_edited=_mean(after),
            )
        )
    if scores_file is not None:
        with scores_file.open("a", encoding="utf-8") as handle:
            handle.writelines(lines)
    return outcomes


def find_raw(
    data_dir: Path, examples: Sequence[Example]
) -> tuple[dict[str, bytes], dict[str, str]]:
    """The raw bytes of `examples`, re-read from the sources recorded in `data_dir`/card.json.

    A split row's id is the reader's id (`<source>:<path in source>[#n | :line]`), so each
    source is read again with the same reader until its wanted ids are found. Returns the
    bytes by id and, for the others, why not (source gone, id not found, bytes changed
    since prepare: the SHA-256 differs). ConfigError if card.json is missing or unreadable.
    """
    card_path = data_dir / "card.json"
    try:
        config = DataConfig.model_validate(json.loads(card_path.read_text("utf-8"))["config"])
    except OSError:
        raise ConfigError(
            f"the robustness suite needs {card_path} (written by `phishgate data prepare`) "
            "to find the raw messages"
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{card_path}: no usable data config ({exc})") from None
    labels = get_task(config.task).labels
    wanted: dict[str, dict[str, Example]] = {}
    for example in examples:
        wanted.setdefault(example.source, {})[example.id] = example
    sources = {s.name: s for s in config.sources}
    found: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    for name, by_id in wanted.items():
        source = sources.get(name)
        if source is None:
            missing.update(dict.fromkeys(by_id, f"source {name!r} is not in the card's config"))
            continue
        left = dict(by_id)
        try:
            for entry in read_source(source, config.data_root or data_dir, labels):
                row = left.pop(entry.id, None)
                if row is None:
                    continue
                if isinstance(entry, Skipped):
                    missing[entry.id] = entry.reason
                elif row.sha256 and entry.sha256 != row.sha256:
                    missing[entry.id] = "raw bytes changed since prepare (SHA-256 differs)"
                else:
                    found[entry.id] = entry.raw
                if not left:
                    break
        except DataSourceError as exc:
            missing.update(dict.fromkeys(left, str(exc)))
            continue
        missing.update(dict.fromkeys(left, f"not found in source {name!r}"))
    return found, missing


def _check_predictors(predictors: Sequence[str], adapter: str | None) -> list[str]:
    unknown = [p for p in predictors if p not in PREDICTORS]
    if unknown:
        raise ConfigError(
            f"unknown predictor(s) {', '.join(map(repr, unknown))}; known: {', '.join(PREDICTORS)}"
        )
    if not predictors:
        raise ConfigError(f"no predictor chosen; known: {', '.join(PREDICTORS)}")
    if "adapter" in predictors and adapter is None:
        raise ConfigError("the adapter predictor needs an adapter (a folder or models:/name@alias)")
    if adapter is not None and "adapter" not in predictors:
        raise ConfigError(f"adapter {adapter!r} given but the adapter predictor is not chosen")
    return list(dict.fromkeys(predictors))


def _split_file(data_dir: Path, split: str) -> Path:
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(f"split file {path} not found (run `phishgate data prepare`?)")
    return path


def _load_splits(data_dir: Path, splits: Sequence[str]) -> dict[str, list[Example]]:
    tables: dict[str, list[Example]] = {}
    for split in dict.fromkeys(splits):
        if split in OPTIONAL_SPLITS and not (data_dir / f"{split}.jsonl").is_file():
            continue
        tables[split] = load_examples(_split_file(data_dir, split))
    return tables


def _build(
    settings: CoreSettings,
    task: Task,
    slug: str,
    adapter: str | None,
    train: Sequence[Example],
    say: Say,
) -> tuple[Predictor, float | None]:
    """The predictor called `slug` and its own threshold (None: choose one on dev)."""
    if slug == "tfidf":
        from phishgate.training.predictors import TfidfPredictor

        return TfidfPredictor.fit(train, task), None
    from phishgate.training.predictors import load_llm_predictor

    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        say(f"{slug}: {done} scored")

    predictor, manifest = load_llm_predictor(
        settings, task, adapter if slug == "adapter" else None, progress=count
    )
    return predictor, manifest.threshold if manifest is not None else None


def _render(
    message: RawMessage, task: Task, tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> Example | Skipped:
    """`message` through the one renderer (as `phishgate data prepare` renders it)."""
    from phishgate.training.data import render_message

    rendered = render_message(message, task, tokenizer, max_tokens)
    if isinstance(rendered, Skipped):
        return rendered
    return Example.from_record(rendered.line())


def _score_line(predictor: str, ident: str, edit: str, score: float) -> str:
    return (
        json.dumps(
            {"predictor": predictor, "id": ident, "edit": edit, "score": round(float(score), 6)}
        )
        + "\n"
    )


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _num(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _fmt(value: float, digits: int = 3, *, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
