"""`phishgate train`: a Ray Train job, tracked in MLflow, its best adapter registered.

The driver validates the config and the data before any work, starts or joins Ray, runs
`phishgate.training.sft.train_worker` on the workers, then logs the run to MLflow: params,
the data card and split hashes, dev metrics per epoch (epoch 0 is the base model), the
test-split eval of the best epoch's adapter with its plots, and the adapter itself as
plain artifacts with its self-description. The adapter is registered as a new version of
`phishgate-<task>` with the alias `challenger`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phishgate.core.adapters import AdapterManifest, write_manifest
from phishgate.core.errors import ConfigError
from phishgate.core.model import resolve_base_model
from phishgate.core.registry import (
    CHALLENGER,
    experiment_id,
    mlflow_client,
    model_name,
    register_adapter,
)
from phishgate.core.settings import CoreSettings
from phishgate.core.tasks import PROMPT_VERSION, get_task
from phishgate.training.config import TrainConfig
from phishgate.training.sft import HISTORY, train_worker

Say = Callable[[str], None]


@dataclass(frozen=True)
class TrainingOutcome:
    run_id: str
    version: str | None
    adapter_dir: Path
    best_epoch: int
    dev_metrics: dict[str, float]
    threshold: float
    seconds: float


def data_dir_for(config: TrainConfig, settings: CoreSettings) -> Path:
    return (config.data_dir or settings.home / "data" / config.task).resolve()


def check_before_work(config: TrainConfig, settings: CoreSettings) -> Path:
    """Everything that can be checked without training; ConfigError naming the field."""
    if config.quantize_4bit or config.use_gpu:
        import torch

        if not torch.cuda.is_available():
            field = "quantize_4bit" if config.quantize_4bit else "use_gpu"
            raise ConfigError(f"{field}: CUDA is not available on this machine")
    data_dir = data_dir_for(config, settings)
    for split in ("train", "dev"):
        if not (data_dir / f"{split}.jsonl").is_file():
            raise ConfigError(
                f"data_dir: {data_dir} has no {split}.jsonl; run `phishgate data prepare "
                f"--task {config.task}` or set data_dir"
            )
    task = get_task(config.task)
    labels = _labels_in(data_dir / "train.jsonl")
    if not labels <= set(task.labels) or len(labels) < 2:
        raise ConfigError(
            f"task: the train split has labels {sorted(labels)}; task {task.name!r} needs "
            f"both of {list(task.labels)} and nothing else"
        )
    resolve_base_model(settings)  # ModelNotPrepared with the command to run
    return data_dir


def _labels_in(path: Path) -> set[str]:
    labels = set()
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                labels.add(str(json.loads(line)["label"]))
    return labels


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hash(data_dir: Path) -> str:
    """sha256 over the train and dev split files: what the adapter learned from."""
    digest = hashlib.sha256()
    for split in ("train", "dev"):
        digest.update((data_dir / f"{split}.jsonl").read_bytes())
    return digest.hexdigest()


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else key, item))
        return out
    return {prefix: value}


def run_training(
    config: TrainConfig, settings: CoreSettings, *, say: Say = print
) -> TrainingOutcome:
    """Train, track and register one adapter; see the module docstring."""
    from phishgate.training.ray_cluster import connect, ray_state_dir

    data_dir = check_before_work(config, settings)
    base = resolve_base_model(settings)
    started = time.perf_counter()
    say(connect(settings))

    import mlflow
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    client = mlflow_client(settings)
    experiment = experiment_id(client, settings)
    storage = config.storage_path or str(ray_state_dir(settings) / "results")
    job = {
        "config": config.model_dump(mode="json"),
        "settings": settings.model_dump(mode="json"),
        "data_dir": str(data_dir),
    }
    commit = git_commit()
    with mlflow.start_run(experiment_id=experiment, run_name=config.name) as run:
        mlflow.log_params(_flat("", config.model_dump(mode="json")))
        mlflow.log_params(
            {
                "base_model": base.short_id,
                "prompt_version": PROMPT_VERSION,
                "max_input_tokens": settings.max_input_tokens,
            }
        )
        mlflow.set_tags({"git_commit": commit, "task": config.task})
        for card in ("card.json", "card.md"):
            if (data_dir / card).is_file():
                mlflow.log_artifact(str(data_dir / card), artifact_path="data")
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=job,
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
            run_config=RunConfig(
                name=f"{config.name}-{run.info.run_id[:8]}",
                storage_path=storage,
                checkpoint_config=CheckpointConfig(
                    checkpoint_score_attribute="dev_f1", checkpoint_score_order="max"
                ),
            ),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}")
        checkpoints = result.best_checkpoints or []
        if not checkpoints:
            raise RuntimeError("training reported no checkpoint")
        # Best dev F1; among ties the earlier epoch (less training, same quality).
        checkpoint, best = max(checkpoints, key=lambda cm: (cm[1]["dev_f1"], -cm[1]["epoch"]))
        staging = Path(tempfile.mkdtemp(prefix="phishgate-adapter-"))
        try:
            adapter_dir = Path(checkpoint.to_directory(str(staging / "adapter")))
            history = json.loads((adapter_dir / HISTORY).read_text())
            for record in history:
                mlflow.log_metrics(record["metrics"], step=record["epoch"])
            dev_metrics = {k: float(v) for k, v in best.items() if k.startswith("dev_")}
            manifest = AdapterManifest(
                task=config.task,
                labels=get_task(config.task).labels,
                threshold=float(best["threshold"]),
                prompt_version=PROMPT_VERSION,
                max_input_tokens=settings.max_input_tokens,
                base_model_id=base.model_id,
                base_weights_hash=base.weights_hash,
                data_hash=data_hash(data_dir),
                git_commit=commit,
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                metrics={"base_" + k: v for k, v in history[0]["metrics"].items()} | dev_metrics,
                lora=config.lora.model_dump(mode="json"),
            )
            write_manifest(adapter_dir, manifest)
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
            version = None
            if config.register_version:
                version = register_adapter(
                    client,
                    task=config.task,
                    run_id=run.info.run_id,
                    artifact_uri=f"{run.info.artifact_uri}/adapter",
                    manifest=manifest,
                )
                say(f"registered {model_name(config.task)} version {version} as @{CHALLENGER}")
            local = settings.home / "adapters" / config.task / run.info.run_id
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(adapter_dir, local, dirs_exist_ok=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds = time.perf_counter() - started
        mlflow.log_metric("train_wall_seconds", seconds)
    return TrainingOutcome(
        run_id=run.info.run_id,
        version=version,
        adapter_dir=local,
        best_epoch=int(best["epoch"]),
        dev_metrics=dev_metrics,
        threshold=float(best["threshold"]),
        seconds=seconds,
    )
