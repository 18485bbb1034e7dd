"""Training smoke test: a few LoRA steps through Ray Train, tracked and registered in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from phishgate.core.settings import CoreSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, prepared_model: Any, tiny_dataset: Path
) -> Any:
    from phishgate.training.config import load_train_config
    from phishgate.training.job import run_training
    from phishgate.training.ray_cluster import disconnect

    settings = _settings(tmp_path_factory, prepared_model)
    config = load_train_config(None, _overrides(tiny_dataset))
    try:
        outcome = run_training(config, settings, say=lambda _: None)
    finally:
        disconnect()
    return settings, outcome


def _settings(factory: pytest.TempPathFactory, prepared_model: Any) -> CoreSettings:
    home = factory.mktemp("train-home")
    (home / "models").symlink_to(prepared_model.path.parent, target_is_directory=True)
    return CoreSettings(home=home, max_input_tokens=256)


def _overrides(data_dir: Path) -> list[str]:
    """A few steps; LoRA on the top 2 layers, so the frozen 28 below are run once."""
    return [
        f"data_dir={data_dir}",
        "batch_size=4",
        "epochs=1",
        "learning_rate=1e-3",
        "lora.r=4",
        "lora.top_layers=2",
    ]


def test_a_version_is_registered_as_challenger(trained: Any) -> None:
    from phishgate.core.registry import list_versions, mlflow_client

    settings, outcome = trained
    versions = list_versions(mlflow_client(settings), "phishing")
    assert [(v.version, v.aliases) for v in versions] == [("1", ("challenger",))]
    assert outcome.version == "1"
    assert float(versions[0].tags["metric.dev_f1"]) == pytest.approx(
        outcome.dev_metrics["dev_f1"], abs=1e-4
    )


def test_the_run_has_params_and_per_epoch_metrics(trained: Any) -> None:
    from phishgate.core.registry import mlflow_client

    settings, outcome = trained
    client = mlflow_client(settings)
    run = client.get_run(outcome.run_id)
    assert run.data.params["lora.r"] == "4" and run.data.params["max_input_tokens"] == "256"
    assert run.data.tags["git_commit"]
    epochs = [m.step for m in client.get_metric_history(outcome.run_id, "dev_f1")]
    assert epochs == [0, 1]  # the base model before training, then the epoch


def test_the_run_logs_the_best_epochs_dev_scores_and_plots_beside_the_adapter(
    trained: Any,
) -> None:
    from phishgate.core.registry import mlflow_client

    settings, outcome = trained
    client = mlflow_client(settings)
    evals = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "eval")}
    assert {"dev_scores.json", "roc.png", "pr.png", "calibration.png", "confusion.png"} <= evals
    adapter = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter and "dev_scores.json" not in adapter


def test_training_without_ray_gives_the_adapter_ray_train_gives(
    trained: Any,
    tmp_path_factory: pytest.TempPathFactory,
    prepared_model: Any,
    tiny_dataset: Path,
) -> None:
    from safetensors.torch import load_file

    from phishgate.training.config import load_train_config
    from phishgate.training.job import run_training

    _, on_ray = trained
    config = load_train_config(None, [*_overrides(tiny_dataset), "register_version=false"])
    settings = _settings(tmp_path_factory, prepared_model)
    local = run_training(config, settings, say=lambda _: None, use_ray=False)
    assert local.version is None and local.best_epoch == on_ray.best_epoch
    ray_weights = load_file(str(on_ray.adapter_dir / "adapter_model.safetensors"))
    local_weights = load_file(str(local.adapter_dir / "adapter_model.safetensors"))
    assert set(local_weights) == set(ray_weights)
    for name, tensor in ray_weights.items():
        torch.testing.assert_close(local_weights[name], tensor, rtol=1e-4, atol=1e-6)


def test_the_registered_adapter_describes_itself_and_only_lora_weights_changed(
    trained: Any, prepared_model: Any
) -> None:
    from safetensors.torch import load_file

    from phishgate.core.model import hash_safetensors_weights
    from phishgate.core.registry import resolve_adapter
    from phishgate.core.tasks import PROMPT_VERSION

    settings, _ = trained
    resolved = resolve_adapter(
        settings, "models:/phishgate-phishing@challenger", settings.home / "cache"
    )
    manifest = resolved.manifest
    assert manifest.base_weights_hash == prepared_model.weights_hash
    assert manifest.prompt_version == PROMPT_VERSION
    assert manifest.max_input_tokens == 256
    assert 0.0 <= manifest.threshold <= 1.0
    assert {"dev_f1", "base_dev_f1"} <= set(manifest.metrics)

    weights = load_file(str(resolved.path / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights)
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero
    layers = {int(name.split("layers.")[1].split(".")[0]) for name in weights}
    assert layers == {28, 29}  # top_layers=2 of 30
    # The base checkpoint on disk is untouched by training.
    assert hash_safetensors_weights(prepared_model.path) == prepared_model.weights_hash


def test_the_registered_adapter_reloads_and_scores_differently_from_the_base(
    trained: Any, tiny_dataset: Path
) -> None:
    from phishgate.core.tasks import get_task
    from phishgate.training.evaluate import load_examples
    from phishgate.training.predictors import load_llm_predictor

    settings, _ = trained
    task = get_task("phishing")
    examples = load_examples(tiny_dataset / "test.jsonl")[:4]
    adapter, manifest = load_llm_predictor(settings, task, "models:/phishgate-phishing@challenger")
    base, _ = load_llm_predictor(settings, task)
    tuned_scores, base_scores = adapter.predict(examples), base.predict(examples)
    assert manifest is not None
    assert np.all((tuned_scores >= 0) & (tuned_scores <= 1))
    assert np.max(np.abs(tuned_scores - base_scores)) > 1e-3


def test_first_promotion_makes_the_challenger_champion_and_records_it(
    trained: Any, tiny_dataset: Path
) -> None:
    import json

    from typer.testing import CliRunner

    from phishgate.core.cli import app
    from phishgate.core.registry import list_versions, mlflow_client
    from phishgate.training.promotion import promote

    settings, _ = trained
    report = promote(settings, "phishing", data_dir=tiny_dataset)
    assert report.decision.promote and not report.decision.forced
    assert report.champion_version is None and set(report.metrics["challenger"]) == {"test"}
    [version] = list_versions(mlflow_client(settings), "phishing")
    assert version.aliases == ("challenger", "champion")
    assert json.loads(version.tags["promotion"])["promoted"] is True

    listed = CliRunner().invoke(
        app,
        ["registry", "list", "phishing"],
        env={"PHISHGATE_HOME": str(settings.home), "COLUMNS": "200"},
    )
    assert listed.exit_code == 0, listed.output
    assert "challenger, champion" in listed.output


def test_promote_reads_the_sets_from_data_dir(trained: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from phishgate.core.cli import app
    from phishgate.core.errors import ConfigError

    settings, _ = trained
    empty = tmp_path / "no-splits"
    empty.mkdir()
    result = CliRunner().invoke(
        app,
        ["registry", "promote", "phishing", "--data-dir", str(empty)],
        env={"PHISHGATE_HOME": str(settings.home), "COLUMNS": "400"},
    )
    # Raised before anything is scored; `phishgate` maps it to EX_CONFIG at the edge.
    assert isinstance(result.exception, ConfigError), result.output
    assert f"no test split in {empty}" in str(result.exception)


def test_classify_uses_the_adapter_and_refuses_the_wrong_task(trained: Any) -> None:
    import os
    import subprocess
    import sys

    from phishgate.core.cli import EX_CONFIG, EX_NOINPUT

    settings, _ = trained
    email = settings.home / "mail.eml"
    email.write_bytes(b"From: IT <it@quota.example>\r\nSubject: Quota\r\n\r\nClick here now.\r\n")
    cli = Path(sys.executable).parent / "phishgate"
    env = {**os.environ, "PHISHGATE_HOME": str(settings.home), "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(cli), "classify", *args, str(email)], capture_output=True, text=True, env=env
        )

    uri = "models:/phishgate-phishing@champion"
    ok = run("--json", "--adapter", uri)
    assert ok.returncode == 0, ok.stderr
    assert '"adapter": "phishgate-phishing v1"' in ok.stdout
    wrong = run("--task", "spam", "--adapter", uri)
    assert wrong.returncode == EX_CONFIG and "is for task 'phishing'" in wrong.stderr
    missing = run("--adapter", "models:/phishgate-phishing@nope")
    assert missing.returncode == EX_NOINPUT and "does not exist" in missing.stderr
