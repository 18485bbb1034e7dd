"""The `phishgate` command, run as a user runs it: a subprocess of the installed script."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from phishgate.core.model import PreparedModel

REPO_ROOT = Path(__file__).resolve().parent.parent
PHISHGATE = REPO_ROOT / ".venv" / "bin" / "phishgate"


def _run(*args: str | Path, home: Path = REPO_ROOT / "var") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHISHGATE_HOME": str(home), "COLUMNS": "200"}
    env.pop("PHISHGATE_BASE_MODEL", None)
    return subprocess.run(
        [str(PHISHGATE), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> tuple[Path, Path]:
    """A real phishing message and a real legitimate one."""
    phishing = shared_data / "phishing_pot" / "email" / "sample-10.eml"
    ham = sorted((shared_data / "modern_ham" / "blinux-list" / "messages").iterdir())[0]
    return phishing, ham


def test_help_lists_the_commands() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "model" in result.stdout
    assert "classify" in result.stdout


def test_domain_error_is_one_clean_line(tmp_path: Path) -> None:
    result = _run("model", "info", home=tmp_path)
    assert result.returncode == 69  # EX_UNAVAILABLE
    assert result.stderr.strip().splitlines() == [
        "error: base model smollm2-135m-instruct is not prepared; run `phishgate model prepare`"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_model_prepare_is_idempotent_and_info_shows_it(prepared_model: PreparedModel) -> None:
    prepared = _run("model", "prepare")
    assert prepared.returncode == 0, prepared.stderr
    assert "already prepared" in prepared.stdout
    assert prepared_model.weights_hash in prepared.stdout
    info = _run("model", "info")
    assert info.returncode == 0, info.stderr
    assert prepared_model.weights_hash in info.stdout
    assert str(prepared_model.path) in info.stdout


@pytest.mark.slow
def test_classify_scores_emails_and_reports_bad_files(
    prepared_model: PreparedModel, samples: tuple[Path, Path], tmp_path: Path
) -> None:
    binary = tmp_path / "image.eml"
    binary.write_bytes(bytes(range(256)) * 64)
    missing = tmp_path / "missing.eml"

    result = _run("classify", samples[0], binary, samples[1], missing)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith(f"error: {binary}: ")
    assert errors[1] == f"error: {missing}: cannot read: No such file or directory"
    rows = [line for line in result.stdout.splitlines() if str(samples[0]) in line]
    rows += [line for line in result.stdout.splitlines() if str(samples[1]) in line]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells[1] in {"phishing", "legitimate"}
        assert 0.0 <= float(cells[2]) <= 1.0
    assert prepared_model.short_id in result.stdout


@pytest.mark.slow
def test_classify_json_lines(prepared_model: PreparedModel, samples: tuple[Path, Path]) -> None:
    result = _run("classify", "--json", "--max-tokens", "256", *samples)

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(s) for s in samples]
    for record in records:
        assert record["label"] in {"phishing", "legitimate"}
        assert 0.0 <= record["score"] <= 1.0
        assert record["score"] == pytest.approx(record["scores"]["phishing"])
        assert 0 < record["n_tokens"] <= 256
        assert isinstance(record["truncated"], bool)
        assert record["model"] == prepared_model.short_id
        assert record["task"] == "phishing"
