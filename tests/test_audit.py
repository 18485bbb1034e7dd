"""Shortcut audit: a source fingerprint in the text is found, named and measured."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from phishgate.core.errors import ConfigError
from phishgate.training.audit import (
    AuditRecord,
    audit_markdown,
    audit_sources,
    load_audit_records,
    write_audit,
)

_VOCAB_TEXT = (
    "please find attached the report for this week and let me know if the numbers look "
    "right before friday thanks again for the quick reply about the server"
)
VOCAB = _VOCAB_TEXT.split()


def _records(seed: int = 0) -> list[AuditRecord]:
    """Three sources; only `lists/old` carries a footer, `bad` is the other label."""
    rng = random.Random(seed)
    records = []
    for i in range(360):
        source = ("lists/old", "lists/new", "bad")[i % 3]
        text = " ".join(rng.choice(VOCAB) for _ in range(40))
        if source == "lists/old":
            text += "\n_______________\nexmh-users mailing list"
        records.append(
            AuditRecord(
                id=f"{source}:{i}",
                source=source,
                label="phishing" if source == "bad" else "legitimate",
                text=text,
                split="train" if i % 5 else ("dev" if i % 2 else "test"),
            )
        )
    return records


def test_audit_finds_a_footer_that_identifies_a_source() -> None:
    report = audit_sources(_records())
    probes = {p.name: p for p in report.probes}
    assert set(probes) == {"source", "source within legitimate"}
    assert report.skipped == []  # one corpus per label: no corpus probe to run

    within = probes["source within legitimate"]
    assert within.classes == ["lists/new", "lists/old"]
    assert within.accuracy == 1.0 and within.baseline_accuracy == 0.5
    top_old = [f for f, _ in within.top_features["lists/old"][:5]]
    assert any("exmh" in f or "mailing" in f for f in top_old), top_old

    overall = probes["source"]
    assert overall.recall["lists/old"] == 1.0
    assert overall.n_train + overall.n_eval == 360
    assert overall.accuracy > overall.baseline_accuracy


def test_probe_without_two_trainable_classes_is_skipped_with_a_reason() -> None:
    records = [r for r in _records() if r.source != "lists/new"]
    records = [r for r in records if not (r.source == "bad" and r.split == "train")]
    report = audit_sources(records)
    assert [p.name for p in report.probes] == []
    assert report.skipped == ["source: fewer than 2 classes with >= 2 train messages, or no eval"]


def test_audit_reads_prepared_splits_and_writes_json_and_markdown(tmp_path: Path) -> None:
    for split in ("train", "dev", "test"):
        lines = [
            {
                "id": r.id,
                "source": r.source,
                "label": r.label,
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": r.text},
                    {"role": "assistant", "content": r.label},
                ],
            }
            for r in _records()
            if r.split == split
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = load_audit_records(tmp_path)
    order = ("train", "dev", "test")
    assert records == sorted(_records(), key=lambda r: order.index(r.split))

    paths = write_audit(audit_sources(records), tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert [p["name"] for p in saved["probes"]] == ["source", "source within legitimate"]
    markdown = paths["md"].read_text()
    assert markdown == audit_markdown(audit_sources(records))
    assert "| source within legitimate | 2 |" in markdown


def test_audit_of_a_folder_without_a_dataset_says_what_to_run(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ConfigError) as caught:
        load_audit_records(tmp_path)
    assert str(caught.value) == (
        f"no prepared dataset in {tmp_path} (missing dev, test.jsonl); run `phishgate data prepare`"
    )
