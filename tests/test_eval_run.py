"""The eval run: predictors x splits of a prepared dataset, robustness suite, summary files.

The prepared dataset is built like `phishgate data prepare` builds one: synthetic .eml files
read by the real source reader and rendered by the real renderer into split rows, with a
card.json recording the sources, so the robustness suite re-reads the raw bytes.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from phishgate.core.errors import ConfigError
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import get_task
from phishgate.training.data import render_message
from phishgate.training.eval_run import examples_from_mail, find_raw, run_eval
from phishgate.training.evaluate import load_examples
from phishgate.training.robustness import EDITS
from phishgate.training.sources import DataConfig, RawMessage, Skipped, SourceConfig, read_source

TASK = get_task("phishing")
N_PER_LABEL = 24  # per label: train 12, dev 6, test 6

BRANDS = ["paypal", "netflix", "dhl", "microsoft", "amazon", "apple", "chase", "office365"]
THREATS = [
    "your account has been suspended",
    "unusual sign-in activity was detected",
    "your password expires today",
    "a payment could not be processed",
    "your mailbox storage is full",
]
ACTIONS = [
    "verify your account immediately",
    "confirm your password and billing details",
    "log in now to avoid permanent closure",
    "update your credentials within 24 hours",
]
NAMES = ["Anna", "Ben", "Carla", "David", "Elif", "Farid", "Greta", "Hugo"]
TOPICS = ["budget", "roadmap", "hiring", "release", "offsite", "security review", "quarterly"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def _phish(rng: random.Random, n: int, *, with_link: bool = True) -> bytes:
    brand = rng.choice(BRANDS)
    host = f"{brand}-secure-login{n}.{rng.choice(['xyz', 'top', 'info'])}"
    link = f"https://{host}/verify?session={rng.randrange(10**6)}" if with_link else ""
    action = rng.choice(ACTIONS)
    body = (
        f"Dear customer,\n\nURGENT: {rng.choice(THREATS)}. You must {action}"
        + (f" at {link}" if link else " by replying with your card number and PIN")
        + ".\nFailure to act will result in suspension.\n\n"
        f"{brand.title()} Security Team\n"
    )
    return _message(f"{brand.title()} Security <alert@{host}>", f"Action required: {action}", body)


def _ham(rng: random.Random, n: int) -> bytes:
    name, topic, day = rng.choice(NAMES), rng.choice(TOPICS), rng.choice(DAYS)
    body = (
        f"Hi {rng.choice(NAMES)},\n\nthanks for the notes from the {topic} meeting. "
        f"Could we go through the open points on {day} after lunch? I put the draft "
        f"agenda in the shared folder, item {n}.\n\nCheers,\n{name}\n"
    )
    return _message(f"{name} <{name.lower()}@example.org>", f"Re: {topic} notes ({n})", body)


def _message(sender: str, subject: str, body: str) -> bytes:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = "team@example.org"
    message["Subject"] = subject
    message.set_content(body)
    return message.as_bytes()


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A prepared dataset: train/dev/test from `synth/*`, holdout from `other/*`."""
    root = tmp_path_factory.mktemp("eval-run")
    mail, data = root / "mail", root / "data"
    rng = random.Random(7)
    for i in range(N_PER_LABEL):
        # one phishing message of test has no link: link edits do not apply to it
        (mail / "synth-phish").mkdir(parents=True, exist_ok=True)
        raw = _phish(rng, i, with_link=i != 3)
        (mail / "synth-phish" / f"p{i:02d}.eml").write_bytes(raw)
        (mail / "synth-ham").mkdir(parents=True, exist_ok=True)
        (mail / "synth-ham" / f"h{i:02d}.eml").write_bytes(_ham(rng, i))
    for i in range(4):
        (mail / "other-phish").mkdir(parents=True, exist_ok=True)
        (mail / "other-phish" / f"o{i}.eml").write_bytes(_phish(rng, 100 + i))
        (mail / "other-ham").mkdir(parents=True, exist_ok=True)
        (mail / "other-ham" / f"o{i}.eml").write_bytes(_ham(rng, 100 + i))
    config = DataConfig(
        task="phishing",
        data_root=mail,
        sources=(
            SourceConfig(name="synth/phish", path="synth-phish", format="eml", label="phishing"),
            SourceConfig(name="synth/ham", path="synth-ham", format="eml", label="legitimate"),
            SourceConfig(name="other/phish", path="other-phish", format="eml", label="phishing"),
            SourceConfig(name="other/ham", path="other-ham", format="eml", label="legitimate"),
        ),
        holdout_sources=("other",),
    )
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in ("train", "dev", "test", "holdout")}
    for source in config.sources:
        for n, entry in enumerate(read_source(source, mail, TASK.labels)):
            assert isinstance(entry, RawMessage)
            example = render_message(entry, TASK, tokenizer, 512)
            assert not isinstance(example, Skipped), example
            split = (
                "holdout" if source.corpus == "other" else ["train", "train", "dev", "test"][n % 4]
            )
            splits[split].append(example.line())
    data.mkdir()
    for split, rows in splits.items():
        _write_rows(data / f"{split}.jsonl", rows)
    card = {"task": "phishing", "config": config.model_dump(mode="json")}
    (data / "card.json").write_text(json.dumps(card), encoding="utf-8")
    return data


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_tfidf_run_writes_reports_and_a_summary(
    core_settings: CoreSettings, prepared: Path, tmp_path: Path
) -> None:
    summary = run_eval(
        core_settings,
        "phishing",
        data_dir=prepared,
        out_dir=tmp_path,
        predictors=("tfidf",),
        robustness=False,
    )
    for split in ("test", "holdout"):
        folder = tmp_path / "tfidf" / split
        assert {"report.json", "scores.jsonl", "roc.png"} <= {p.name for p in folder.iterdir()}
        report = json.loads((folder / "report.json").read_text())
        assert report["split"] == split and report["threshold_source"] == "best F1 on dev"
        assert len(_ids(folder / "scores.jsonl")) == report["metrics"]["n"]
    test = summary.result("tfidf", "test").report
    assert test.metrics.n == N_PER_LABEL // 2 and test.metrics.f1 > 0.8
    assert summary.result("tfidf", "holdout").report.metrics.f1 > 0.8
    assert summary.skipped_splits == [] and summary.robustness is None

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["predictor"], r["split"]) for r in saved["results"]] == [
        ("tfidf", "test"),
        ("tfidf", "holdout"),
    ]
    assert saved["samples"]["test"] == {"used": 12, "total": 12, "sampled": False}
    markdown = (tmp_path / "summary.md").read_text()
    assert (
        "| predictor | split | n | F1 | precision | recall | ROC-AUC | PR-AUC | ECE |" in markdown
    )
    assert "| tfidf | test | 12 |" in markdown
    assert "## holdout by source" in markdown
    assert "| tfidf | other/phish | 4 | 4 |" in markdown
    assert "sample of" not in markdown and "test: all 12" in markdown


def test_limit_takes_the_same_stratified_sample_for_the_same_seed(
    core_settings: CoreSettings, prepared: Path, tmp_path: Path
) -> None:
    def ids(out: Path, seed: int) -> list[str]:
        run_eval(
            core_settings,
            "phishing",
            data_dir=prepared,
            out_dir=out,
            splits=("test",),
            predictors=("tfidf",),
            limit=6,
            seed=seed,
            robustness=False,
        )
        return _ids(out / "tfidf" / "test" / "scores.jsonl")

    first, again, other = ids(tmp_path / "a", 0), ids(tmp_path / "b", 0), ids(tmp_path / "c", 1)
    assert first == again and len(first) == 6
    assert sorted(first) != sorted(other)
    labels = {json.loads(line)["label"] for line in (tmp_path / "a/tfidf/test/scores.jsonl").open()}
    assert labels == {"phishing", "legitimate"}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["samples"]["test"] == {"used": 6, "total": 12, "sampled": True}
    assert summary["samples"]["dev"] == {"used": 6, "total": 12, "sampled": True}
    assert "test: a sample of 6 of 12" in (tmp_path / "a" / "summary.md").read_text()


def test_robustness_table_has_one_row_per_edit_and_predictor(
    core_settings: CoreSettings, prepared: Path, tmp_path: Path
) -> None:
    summary = run_eval(
        core_settings,
        "phishing",
        data_dir=prepared,
        out_dir=tmp_path,
        splits=("test",),
        predictors=("tfidf",),
    )
    suite = summary.robustness
    assert suite is not None
    positives = [e for e in load_examples(prepared / "test.jsonl") if e.label == "phishing"]
    assert suite.available == suite.sampled == suite.found == len(positives)
    assert suite.missing == {} and suite.stale == 0
    assert [(o.edit, o.predictor) for o in suite.outcomes] == [(e, "tfidf") for e in EDITS]
    for outcome in suite.outcomes:
        assert outcome.applied + outcome.not_applicable + outcome.unrenderable == suite.found
        assert 0.0 <= outcome.recall_edited <= 1.0 and 0.0 <= outcome.recall_unedited <= 1.0
    by_edit = {o.edit: o for o in suite.outcomes}
    # one phishing message of test has no link
    assert by_edit["homoglyph_links"].not_applicable == 1
    assert by_edit["prompt_injection"].not_applicable == 0

    lines = [json.loads(line) for line in (tmp_path / "robustness_scores.jsonl").open()]
    assert len(lines) == suite.found + sum(o.applied for o in suite.outcomes)
    assert sum(line["edit"] == "none" for line in lines) == suite.found
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Robustness (phishing messages of test)" in markdown
    assert (
        sum(
            line.startswith("| homoglyph_links | tfidf | 5 | 1 | 0 |")
            for line in markdown.splitlines()
        )
        == 1
    )
    saved = json.loads((tmp_path / "summary.json").read_text())["robustness"]
    assert len(saved["edits"]) == len(EDITS) and saved["raw_found"] == suite.found


def test_find_raw_reports_ids_it_cannot_match(prepared: Path) -> None:
    test = load_examples(prepared / "test.jsonl")
    good, changed = test[0], replace(test[1], sha256="0" * 64)
    gone = replace(test[2], id="synth/ham:nope.eml", source="synth/ham")
    found, missing = find_raw(prepared, [good, changed, gone])
    assert set(found) == {good.id}
    assert "SHA-256 differs" in missing[changed.id]
    assert "not found" in missing[gone.id]


def test_examples_from_mail_reads_folders_and_mbox_and_renders(
    prepared: Path, tokenizer: Any, tmp_path: Path
) -> None:
    card = json.loads((prepared / "card.json").read_text())
    folder = Path(card["config"]["data_root"]) / "other-phish"
    examples, skipped = examples_from_mail(folder, "phishing", TASK, tokenizer, 512)
    assert len(examples) == 4 and not skipped
    assert {e.label for e in examples} == {"phishing"} and examples[0].id.startswith("mail:")
    assert "Subject: Action required" in examples[0].user_text

    mbox = tmp_path / "junk.mbox"
    parts = [
        b"From alert@x.example Mon Jan  1 00:00:00 2024\n" + raw
        for raw in ((folder / "o0.eml").read_bytes(), (folder / "o1.eml").read_bytes())
    ]
    mbox.write_bytes(b"\n".join(parts))
    from_mbox, _ = examples_from_mail(mbox, "phishing", TASK, tokenizer, 512)
    assert [e.id.rsplit("#", 1)[1] for e in from_mbox] == ["1", "2"]
    with pytest.raises(ConfigError, match="label 'spam'"):
        examples_from_mail(mbox, "spam", TASK, tokenizer, 512)


def test_mail_is_graded_as_its_own_split(
    core_settings: CoreSettings, prepared: Path, tokenizer: Any, tmp_path: Path
) -> None:
    card = json.loads((prepared / "card.json").read_text())
    folder = Path(card["config"]["data_root"]) / "other-phish"
    mail, _ = examples_from_mail(folder, "phishing", TASK, tokenizer, 512)
    summary = run_eval(
        core_settings,
        "phishing",
        data_dir=prepared,
        out_dir=tmp_path,
        splits=(),
        predictors=("tfidf",),
        mail=mail,
        robustness=False,
    )
    report = summary.result("tfidf", "mail").report
    assert report.metrics.n == 4 and report.metrics.n_positive == 4
    assert (tmp_path / "tfidf" / "mail" / "report.json").is_file()
    assert "## mail by source" in (tmp_path / "summary.md").read_text()


def test_a_missing_holdout_is_skipped_and_noted(
    core_settings: CoreSettings, prepared: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (data / "holdout.jsonl").unlink()
    summary = run_eval(
        core_settings,
        "phishing",
        data_dir=data,
        out_dir=tmp_path / "out",
        predictors=("tfidf",),
        robustness=False,
    )
    assert summary.skipped_splits == ["holdout"]
    assert [r.split for r in summary.results] == ["test"]
    assert (
        "holdout: no holdout.jsonl, not evaluated" in (tmp_path / "out" / "summary.md").read_text()
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"splits": ("test", "validation")}, r"validation\.jsonl not found"),
        ({"predictors": ("tfidf", "bert")}, "unknown predictor.*'bert'"),
        ({"predictors": ("adapter",)}, "adapter predictor needs an adapter"),
        ({"predictors": ("tfidf",), "adapter": "models:/x@champion"}, "not chosen"),
    ],
)
def test_bad_inputs_fail_before_scoring_with_a_clear_error(
    core_settings: CoreSettings,
    prepared: Path,
    tmp_path: Path,
    kwargs: dict[str, Any],
    message: str,
) -> None:
    options: dict[str, Any] = {"predictors": ("tfidf",), "robustness": False, **kwargs}
    with pytest.raises(ConfigError, match=message):
        run_eval(core_settings, "phishing", data_dir=prepared, out_dir=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_robustness_without_a_card_names_the_file(
    core_settings: CoreSettings, prepared: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (data / "card.json").unlink()
    with pytest.raises(ConfigError, match=r"card\.json"):
        run_eval(
            core_settings,
            "phishing",
            data_dir=data,
            out_dir=tmp_path / "out",
            predictors=("tfidf",),
        )


@pytest.mark.slow
def test_zero_shot_scores_a_small_sample_with_the_real_model(
    core_settings: CoreSettings, prepared_model: Any, prepared: Path, tmp_path: Path
) -> None:
    summary = run_eval(
        core_settings,
        "phishing",
        data_dir=prepared,
        out_dir=tmp_path,
        splits=("test",),
        predictors=("zero-shot",),
        limit=8,
        robustness_limit=2,
    )
    report = json.loads((tmp_path / "zero-shot" / "test" / "report.json").read_text())
    assert report["predictor"].startswith("zero-shot") and report["metrics"]["n"] == 8
    scores = [
        json.loads(line)["score"] for line in (tmp_path / "zero-shot/test/scores.jsonl").open()
    ]
    assert len(scores) == 8 and all(0.0 <= s <= 1.0 for s in scores)
    assert summary.predictors["zero-shot"]["threshold_source"] == "best F1 on dev"
    assert summary.robustness is not None and summary.robustness.found == 2
    assert len(summary.robustness.outcomes) == len(EDITS)


def test_bench_payloads_come_from_the_named_data_dir(prepared: Path, tmp_path: Path) -> None:
    command = [str(Path(sys.executable).with_name("phishgate")), "bench", "limit"]
    options = ["--data-dir", prepared, "--messages", "4", "--size", "64", "--repeats", "1"]
    result = subprocess.run(
        [*command, *map(str, options), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "payloads" / "manifest.json").read_text())
    test_ids = set(_ids(prepared / "test.jsonl"))
    assert manifest["source"] == f"{prepared.name}/test (seed 0)"
    assert len(manifest["payloads"]) == 4
    assert {p["id"] for p in manifest["payloads"]} <= test_ids
    assert json.loads((tmp_path / "limit.json").read_text())["emails"] == 4
