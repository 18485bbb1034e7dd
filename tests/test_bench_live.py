"""A 10-second locust run against a live `phishgate serve classifier` (zero-shot base model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from phishgate.bench.load import classifier_process, run_sweep
from phishgate.bench.payloads import mail_messages, write_payloads
from phishgate.bench.runs import build_report
from phishgate.bench.settings import DEFAULT_PROFILES
from phishgate.core.tasks import get_task
from tests.conftest import REPO_ROOT

# A short budget keeps each request around a second on a busy 2-core machine.
BUDGET = 128


@pytest.mark.slow
def test_locust_against_a_live_classifier(
    tmp_path: Path, shared_data: Path, tokenizer: Any, prepared_model: Any
) -> None:
    if not (REPO_ROOT / "services" / "classifier" / "app.py").is_file():
        pytest.skip("the classifier service (services/classifier/app.py) is not built yet")
    messages = [
        *mail_messages(shared_data / "phishing_pot" / "email", 2),
        *mail_messages(shared_data / "modern_ham" / "blinux-list" / "messages", 2),
    ]
    payloads = write_payloads(
        messages, tmp_path / "payloads", get_task("phishing"), tokenizer, BUDGET, "shared"
    )
    assert len(payloads.payloads) == 4
    env = {"PHISHGATE_HOME": str(REPO_ROOT / "var"), "PHISHGATE_MAX_INPUT_TOKENS": str(BUDGET)}
    with classifier_process(tmp_path / "classifier.log", env) as address:
        result = run_sweep(
            address, [2], 10, payloads.folder, payloads.summary(), tmp_path, hardware="cpu-2core"
        )

    (only,) = result.steps
    assert only.users == 2
    assert only.requests >= 1, (tmp_path / "users-2.log").read_text()
    assert only.failures == 0, (tmp_path / "users-2_failures.csv").read_text()
    assert only.rps > 0
    assert 0 < only.p50_ms <= only.p95_ms <= only.p99_ms

    with (tmp_path / "users-2_stats.csv").open() as stream:
        rows = {row["Name"]: row for row in csv.DictReader(stream)}
    assert int(rows["Classify"]["Request Count"]) == only.requests  # recorded per method
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["steps"][0]["requests"] == only.requests
    assert saved["payloads"]["count"] == 4

    files = build_report(
        tmp_path, profiles_path=DEFAULT_PROFILES, p95_budget_ms=500, measured={}, mail_flow=None
    )
    row = f"| 2 | {only.requests} | 0 | {only.rps:.2f} |"
    assert row in files.markdown.read_text()


@pytest.mark.slow
def test_naive_baseline_on_the_real_model(prepared_model: Any, tokenizer: Any) -> None:
    from phishgate.bench.baseline import BaselineResult, run_baseline
    from phishgate.core.model import load_causal_lm
    from phishgate.core.render import render_email
    from tests.conftest import LEGITIMATE_TEMPLATES, PHISHING_TEMPLATES, synthetic_email

    task = get_task("phishing")
    rendered = [
        render_email(synthetic_email(*(p.format(n=1) for p in t[0])), task, tokenizer, BUDGET)
        for t in (PHISHING_TEMPLATES, LEGITIMATE_TEMPLATES)
    ]
    model = load_causal_lm(prepared_model.path)
    result = run_baseline(
        model, tokenizer, task, rendered, model_name="base", max_new_tokens=6, batch_size=2
    )
    assert result.emails == 2
    assert 0 < result.mean_generated_tokens <= 6
    assert len(result.sample_answers) == 2
    assert result.unparsed <= 2
    for rate in (result.generate, result.score_single, result.score_batched):
        assert rate.emails == 2 and rate.seconds > 0
    assert BaselineResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
