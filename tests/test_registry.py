"""Adapter self-description and the MLflow registry on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phishgate.core.adapters import AdapterManifest, check_compatible, read_manifest, write_manifest
from phishgate.core.errors import AdapterMismatch, AdapterNotFound, ConfigError
from phishgate.core.registry import (
    CHALLENGER,
    CHAMPION,
    experiment_id,
    list_versions,
    mlflow_client,
    model_name,
    parse_models_uri,
    register_adapter,
    resolve_adapter,
)
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import PROMPT_VERSION


def _manifest(**overrides: object) -> AdapterManifest:
    values: dict[str, object] = {
        "task": "phishing",
        "labels": ("legitimate", "phishing"),
        "threshold": 0.42,
        "prompt_version": PROMPT_VERSION,
        "max_input_tokens": 512,
        "base_model_id": "SmolLM2-135M-Instruct",
        "base_weights_hash": "ab" * 32,
        "metrics": {"f1": 0.97},
    }
    values.update(overrides)
    return AdapterManifest(**values)  # type: ignore[arg-type]


def _adapter_folder(root: Path, marker: str, manifest: AdapterManifest) -> Path:
    folder = root / marker
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "marker": marker}))
    (folder / "adapter_model.safetensors").write_bytes(marker.encode() * 100)
    write_manifest(folder, manifest)
    return folder


def test_manifest_round_trips_and_checks_compatibility(tmp_path: Path) -> None:
    folder = _adapter_folder(tmp_path, "a", _manifest())
    manifest = read_manifest(folder)
    assert manifest == _manifest()
    assert manifest.positive_label == "phishing"
    check_compatible(manifest, base_weights_hash="ab" * 32)
    with pytest.raises(AdapterMismatch, match="base model"):
        check_compatible(manifest, base_weights_hash="cd" * 32)
    with pytest.raises(AdapterMismatch, match="prompt version"):
        check_compatible(manifest, base_weights_hash="ab" * 32, prompt_version="pg-prompt-0")
    with pytest.raises(AdapterMismatch, match="labels"):
        check_compatible(_manifest(labels=("ham", "phishing")), base_weights_hash="ab" * 32)


def test_folders_without_a_manifest_or_peft_config_are_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"phishgate-adapter\.json"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="not a PEFT adapter"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "phishgate-adapter.json").write_text(json.dumps({"task": "phishing"}))
    with pytest.raises(ConfigError, match="lacks"):
        read_manifest(tmp_path)


def test_models_uri_parsing() -> None:
    assert parse_models_uri("models:/phishgate-phishing@champion") == (
        "phishgate-phishing",
        "champion",
    )
    assert parse_models_uri("models:/phishgate-spam/3") == ("phishgate-spam", "3")
    with pytest.raises(ConfigError):
        parse_models_uri("models:/nothing")


def test_register_alias_resolve_and_list_on_sqlite(tmp_path: Path) -> None:
    import mlflow

    settings = CoreSettings(home=tmp_path / "home")
    client = mlflow_client(settings)
    assert settings.tracking_uri.startswith("sqlite:///")
    exp = experiment_id(client, settings)
    versions = []
    for marker in ("first", "second"):
        folder = _adapter_folder(tmp_path / "src", marker, _manifest())
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(folder), artifact_path="adapter")
            uri = f"{run.info.artifact_uri}/adapter"
        versions.append(
            register_adapter(
                client,
                task="phishing",
                run_id=run.info.run_id,
                artifact_uri=uri,
                manifest=_manifest(),
            )
        )
    assert versions == ["1", "2"]
    client.set_registered_model_alias(model_name("phishing"), CHAMPION, "1")

    cache = tmp_path / "cache"
    champion = resolve_adapter(settings, "models:/phishgate-phishing@champion", cache)
    challenger = resolve_adapter(settings, "models:/phishgate-phishing@challenger", cache)
    assert champion.ref.version == "1" and challenger.ref.version == "2"
    assert json.loads((champion.path / "adapter_config.json").read_text())["marker"] == "first"
    assert json.loads((challenger.path / "adapter_config.json").read_text())["marker"] == "second"
    assert champion.manifest.threshold == pytest.approx(0.42)
    assert not any(p.name.startswith(".") for p in (cache / "phishgate-phishing").iterdir())

    listed = list_versions(client, "phishing")
    assert [(v.version, v.aliases) for v in listed] == [("2", (CHALLENGER,)), ("1", (CHAMPION,))]
    assert listed[0].tags["metric.f1"] == "0.9700"

    with pytest.raises(AdapterNotFound):
        resolve_adapter(settings, "models:/phishgate-phishing@nope", cache)
    with pytest.raises(AdapterNotFound):
        resolve_adapter(settings, "models:/phishgate-unknown@champion", cache)
    with pytest.raises(AdapterNotFound):
        resolve_adapter(settings, str(tmp_path / "no-such-folder"), cache)


def test_local_adapter_versions_are_content_hashes(tmp_path: Path) -> None:
    settings = CoreSettings(home=tmp_path / "home")
    a = resolve_adapter(settings, str(_adapter_folder(tmp_path, "a", _manifest())), tmp_path)
    b = resolve_adapter(settings, str(_adapter_folder(tmp_path, "b", _manifest())), tmp_path)
    assert a.ref.version != b.ref.version and len(a.ref.version) == 12


def test_opening_a_store_does_not_leak_into_the_next_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow_client(CoreSettings(home=tmp_path / "a"))
    assert CoreSettings(home=tmp_path / "b").tracking_uri.startswith(f"sqlite:///{tmp_path / 'b'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    mlflow_client(
        CoreSettings(home=tmp_path / "c", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'x.db'}")
    )
    assert CoreSettings().tracking_uri == "http://mlflow.internal:5000"
