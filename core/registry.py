"""Adapters in the MLflow model registry: register, alias, resolve, list.

Adapters are stored as plain artifacts (PEFT files + `phishgate-adapter.json`) and every
registered version points at them; `models:/<name>@<alias>` is resolved by downloading
those files into a local cache. MLflow's transformers flavour is deliberately not used
(DESIGN invariant 4). The embedded default is SQLite plus a local artifact folder under
the state folder; a tracking server is a setting (`MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phishgate.core.adapters import AdapterManifest, read_manifest
from phishgate.core.errors import AdapterNotFound, ConfigError, EngineUnavailable
from phishgate.core.settings import CoreSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "phishgate"


def model_name(task: str) -> str:
    """Registered model name of a task's adapters."""
    return f"phishgate-{task}"


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter version: registry name and version, or a local path and content hash."""

    name: str
    version: str
    source: str


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter on local disk, ready to load."""

    path: Path
    ref: AdapterRef
    manifest: AdapterManifest


@dataclass(frozen=True)
class VersionInfo:
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)


def mlflow_client(settings: CoreSettings) -> MlflowClient:
    """A client on the configured tracking/registry store (the embedded one by default)."""
    import mlflow
    from mlflow import MlflowClient

    if not settings.mlflow_tracking_uri:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
    # MLflow exports the URI into os.environ for its subprocesses; undo that, or the next
    # CoreSettings read in this process would take it for the user's MLFLOW_TRACKING_URI.
    exported = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    if exported is None:
        os.environ.pop(TRACKING_URI_ENV, None)
    else:
        os.environ[TRACKING_URI_ENV] = exported
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def experiment_id(client: MlflowClient, settings: CoreSettings, name: str = EXPERIMENT) -> str:
    """The id of experiment `name`, created on first use (artifacts under `home` locally)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    location = None if settings.mlflow_tracking_uri else settings.artifact_root.as_uri()
    return str(client.create_experiment(name, artifact_location=location))


def register_adapter(
    client: MlflowClient,
    *,
    task: str,
    run_id: str,
    artifact_uri: str,
    manifest: AdapterManifest,
    alias: str = CHALLENGER,
) -> str:
    """Register the adapter artifacts at `artifact_uri` as a new version; set `alias` on it."""
    from mlflow.exceptions import MlflowException

    name = model_name(task)
    try:
        client.create_registered_model(name, description=f"phishgate LoRA adapters, task {task}")
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
            raise
    tags = {
        "prompt_version": manifest.prompt_version,
        "base_model": f"{manifest.base_model_id}@{manifest.base_weights_hash[:8]}",
        "threshold": f"{manifest.threshold:.4f}",
        "data_hash": manifest.data_hash,
        **{f"metric.{k}": f"{v:.4f}" for k, v in manifest.metrics.items()},
    }
    version = client.create_model_version(name, source=artifact_uri, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def list_versions(client: MlflowClient, task: str) -> list[VersionInfo]:
    """Every registered version of the task's adapter, newest first."""
    name = model_name(task)
    versions = client.search_model_versions(f"name = '{name}'")
    aliases: dict[str, list[str]] = {}
    try:
        registered = client.get_registered_model(name)
        for alias, version in (registered.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
    except Exception as exc:
        raise AdapterNotFound(f"no registered model {name!r}") from exc
    return sorted(
        (
            VersionInfo(
                version=str(v.version),
                aliases=tuple(sorted(aliases.get(str(v.version), []))),
                tags=dict(v.tags or {}),
            )
            for v in versions
        ),
        key=lambda info: int(info.version),
        reverse=True,
    )


def parse_models_uri(uri: str) -> tuple[str, str]:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> (name, alias or version)."""
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, _, ref = body.partition("@")
    else:
        name, _, ref = body.partition("/")
    if not name or not ref:
        raise ConfigError(f"{uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    return name, ref


def resolve_adapter(settings: CoreSettings, location: str, cache_dir: Path) -> ResolvedAdapter:
    """A local adapter folder for `location`: a path, or a `models:/` URI downloaded once.

    AdapterNotFound if the path, model, alias or version does not exist; EngineUnavailable
    if the registry cannot be reached.
    """
    if not location.startswith("models:/"):
        path = Path(location).expanduser()
        if not path.is_dir():
            raise AdapterNotFound(f"adapter folder {location} does not exist")
        manifest = read_manifest(path)
        return ResolvedAdapter(
            path, AdapterRef(path.name, _content_hash(path), str(path)), manifest
        )

    from mlflow.exceptions import MlflowException

    name, ref = parse_models_uri(location)
    client = mlflow_client(settings)
    try:
        mv = (
            client.get_model_version(name, ref)
            if ref.isdigit()
            else client.get_model_version_by_alias(name, ref)
        )
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
            raise AdapterNotFound(f"{location} does not exist in the registry") from None
        raise EngineUnavailable(f"registry unreachable while resolving {location}") from exc
    version = str(mv.version)
    target = cache_dir / name / version
    if not (target / "adapter_config.json").is_file():
        _download(f"models:/{name}/{version}", target)
    return ResolvedAdapter(target, AdapterRef(name, version, location), read_manifest(target))


def _download(uri: str, target: Path) -> None:
    """Download into a temporary sibling, then rename: a half download is never used."""
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(uri, dst_path=str(staging))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def version_metrics(info: VersionInfo) -> dict[str, Any]:
    """Metrics recorded as `metric.<name>` tags on a version."""
    return {
        k.removeprefix("metric."): float(v) for k, v in info.tags.items() if k.startswith("metric.")
    }


@dataclass
class ScoringModel:
    """A base model, optionally with one adapter applied, ready to score."""

    model: Any
    tokenizer: Any
    base_short_id: str
    adapter: ResolvedAdapter | None

    @property
    def name(self) -> str:
        if self.adapter is None:
            return f"zero-shot {self.base_short_id}"
        return f"{self.adapter.ref.name} v{self.adapter.ref.version}"


def load_scoring_model(settings: CoreSettings, adapter: str | None = None) -> ScoringModel:
    """The prepared base model, plus `adapter` (a folder or `models:/` URI) when given.

    The adapter must describe itself and match the base model and prompt version
    (AdapterMismatch otherwise, before any weights are loaded).
    """
    from phishgate.core.adapters import check_compatible
    from phishgate.core.model import (
        compute_dtype,
        load_causal_lm,
        load_tokenizer,
        resolve_base_model,
    )

    base = resolve_base_model(settings)
    resolved = None
    if adapter is not None:
        resolved = resolve_adapter(settings, adapter, settings.home / "adapter-cache")
        check_compatible(resolved.manifest, base_weights_hash=base.weights_hash)
    tokenizer = load_tokenizer(base.path)
    dtype = compute_dtype(settings.inference_dtype)
    model = load_causal_lm(base.path, dtype, threads=settings.torch_threads)
    if resolved is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.path))
        model.eval()
    return ScoringModel(model, tokenizer, base.short_id, resolved)
