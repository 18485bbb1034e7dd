"""Shortcut audit: how well can a bag of n-grams tell which source a message came from?

    phishgate data audit [--task phishing]

A TF-IDF (word 1-2-grams + character 3-5-grams) logistic regression is trained on the
rendered user text of the train split and evaluated on dev + test (the group-aware split
of `phishgate.training.splits`, so no campaign is on both sides). Probes:

- `source`: every source against every other. Far above the majority baseline means the
  rendered text carries source fingerprints; the top features say which (list tags,
  footers, header remnants, era).
- `source within L` and `corpus within L`: the same within one label, where a model
  that tells sources apart learns something other than the label (e.g. 2002 ham vs
  modern ham). High accuracy here is a shortcut the renderer should remove.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phishgate.core.errors import ConfigError
from phishgate.training.splits import SPLITS

TOP_FEATURES = 15
MIN_CLASS_TRAIN = 2


@dataclass(frozen=True)
class AuditRecord:
    """One rendered message: its source, label, user text and split."""

    id: str
    source: str
    label: str
    text: str
    split: str

    @property
    def corpus(self) -> str:
        return self.source.split("/", 1)[0]


@dataclass(frozen=True)
class ProbeResult:
    """One classifier predicting `target` (source or corpus) on the eval records.

    `baseline_accuracy` always predicts the most frequent train class; `recall` covers the
    classes present in eval and `balanced_accuracy` is its mean; `top_features` are the
    largest weights towards each class."""

    name: str
    target: str
    classes: list[str]
    n_train: int
    n_eval: int
    accuracy: float
    baseline_accuracy: float
    balanced_accuracy: float
    recall: dict[str, float]
    support: dict[str, int]
    top_features: dict[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class AuditReport:
    """All probes run on one dataset, plus the probes skipped and why."""

    probes: list[ProbeResult]
    skipped: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"probes": [asdict(p) for p in self.probes], "skipped": self.skipped}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of one JSONL split file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_audit_records(data_dir: Path) -> list[AuditRecord]:
    """Records of train/dev/test.jsonl in `data_dir` (the user message as text);
    ConfigError if the folder holds no prepared dataset."""
    missing = [s for s in SPLITS if not (data_dir / f"{s}.jsonl").is_file()]
    if missing:
        raise ConfigError(
            f"no prepared dataset in {data_dir} (missing {', '.join(missing)}.jsonl); "
            "run `phishgate data prepare`"
        )
    records = []
    for split in SPLITS:
        for line in read_jsonl(data_dir / f"{split}.jsonl"):
            user = next(m["content"] for m in line["messages"] if m["role"] == "user")
            records.append(AuditRecord(line["id"], line["source"], line["label"], user, split))
    return records


def featurize(records: Sequence[AuditRecord]) -> tuple[Any, list[str]]:
    """TF-IDF word 1-2-grams + char 3-5-grams fitted on the train records; one row per
    record (sparse) and the feature names (`w:` word, `c:` character n-grams)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=200_000, sublinear_tf=True)
    chars = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(3, 5), min_df=3, max_features=200_000, sublinear_tf=True
    )
    features = FeatureUnion([("w", words), ("c", chars)])
    features.fit([r.text for r in records if r.split == "train"])
    matrix = features.transform([r.text for r in records]).tocsr()
    return matrix, [n.replace("__", ":", 1) for n in features.get_feature_names_out()]


def probe(
    name: str,
    target: str,
    records: Sequence[AuditRecord],
    matrix: Any,
    names: Sequence[str],
    top_k: int = TOP_FEATURES,
) -> ProbeResult | str:
    """Fit a logistic regression on the train rows of `matrix` (aligned with `records`) and
    score it on the others; a reason string if it cannot run."""
    from sklearn.linear_model import LogisticRegression

    def y(r: AuditRecord) -> str:
        return r.source if target == "source" else r.corpus

    counts = Counter(y(r) for r in records if r.split == "train")
    classes = sorted(c for c, n in counts.items() if n >= MIN_CLASS_TRAIN)
    train = [i for i, r in enumerate(records) if r.split == "train" and y(r) in classes]
    test = [i for i, r in enumerate(records) if r.split != "train" and y(r) in classes]
    if len(classes) < 2 or not test:
        return f"{name}: fewer than 2 classes with >= {MIN_CLASS_TRAIN} train messages, or no eval"

    model = LogisticRegression(max_iter=2000, class_weight="balanced")
    model.fit(matrix[train], [y(records[i]) for i in train])
    predicted = model.predict(matrix[test])
    truth = [y(records[i]) for i in test]

    majority = Counter(y(records[i]) for i in train).most_common(1)[0][0]
    support = Counter(truth)
    recall: dict[str, float] = {}
    for c in classes:
        hits = sum(1 for t, p in zip(truth, predicted, strict=True) if t == c and p == c)
        if support[c]:
            recall[c] = round(hits / support[c], 4)
    binary = len(model.classes_) == 2
    top: dict[str, list[tuple[str, float]]] = {}
    for k, c in enumerate(model.classes_):
        # A binary model has one row of weights, positive towards classes_[1].
        weights = (model.coef_[0] if k == 1 else -model.coef_[0]) if binary else model.coef_[k]
        best = weights.argsort()[::-1][:top_k]
        top[str(c)] = [(names[i], round(float(weights[i]), 3)) for i in best]
    return ProbeResult(
        name=name,
        target=target,
        classes=classes,
        n_train=len(train),
        n_eval=len(test),
        accuracy=round(sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth), 4),
        baseline_accuracy=round(support[majority] / len(truth), 4),
        balanced_accuracy=round(sum(recall.values()) / len(recall), 4),
        recall=recall,
        support=dict(support),
        top_features=top,
    )


def audit_sources(records: Sequence[AuditRecord], top_k: int = TOP_FEATURES) -> AuditReport:
    """Run the `source` probe and, per label, the `source` and `corpus` probes within it.

    Features are fitted once on the train records and shared by every probe."""
    matrix, names = featurize(records)
    plans: list[tuple[str, str, list[int]]] = [("source", "source", list(range(len(records))))]
    for label in sorted({r.label for r in records}):
        rows = [i for i, r in enumerate(records) if r.label == label]
        if len({records[i].source for i in rows}) > 1:
            plans.append((f"source within {label}", "source", rows))
        if len({records[i].corpus for i in rows}) > 1:
            plans.append((f"corpus within {label}", "corpus", rows))
    probes: list[ProbeResult] = []
    skipped: list[str] = []
    for name, target, rows in plans:
        subset = [records[i] for i in rows]
        result = probe(name, target, subset, matrix[rows], names, top_k)
        if isinstance(result, str):
            skipped.append(result)
        else:
            probes.append(result)
    return AuditReport(probes, skipped)


def audit_markdown(report: AuditReport) -> str:
    """The report as Markdown: accuracy vs baseline, recall and top features per class."""
    out = [
        "# Shortcut audit",
        "",
        "| probe | classes | train | eval | accuracy | majority baseline | balanced accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report.probes:
        out.append(
            f"| {p.name} | {len(p.classes)} | {p.n_train} | {p.n_eval} | "
            f"{p.accuracy:.3f} | {p.baseline_accuracy:.3f} | {p.balanced_accuracy:.3f} |"
        )
    out.append("")
    out += [f"- skipped: {s}" for s in report.skipped]
    for p in report.probes:
        out += [
            "",
            f"## {p.name}",
            "",
            "| class | eval | recall | top features |",
            "|---|---|---|---|",
        ]
        for c in p.classes:
            feats = ", ".join(f"`{_md(f)}` {w:.2f}" for f, w in p.top_features.get(c, [])[:10])
            recall = f"{p.recall[c]:.3f}" if c in p.recall else "—"
            out.append(f"| {c} | {p.support.get(c, 0)} | {recall} | {feats} |")
    return "\n".join(out) + "\n"


def _md(feature: str) -> str:
    """A feature for a Markdown table: spaces of character n-grams shown as ␣."""
    if feature.startswith("c:"):
        feature = feature.replace(" ", "␣")
    return feature.replace("|", "\\|").replace("`", "'").replace("\n", "\\n")


def write_audit(report: AuditReport, out_dir: Path) -> Mapping[str, Path]:
    """Write audit.json and audit.md into `out_dir`; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "audit.json", "md": out_dir / "audit.md"}
    paths["json"].write_text(
        json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    paths["md"].write_text(audit_markdown(report), encoding="utf-8")
    return paths
