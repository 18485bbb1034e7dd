"""`phishgate train`: a Ray Train job, tracked in MLflow, its best adapter registered.

The driver validates the config and the data before any work, starts or joins Ray, runs
`phishgate.training.sft.train_worker` on the workers, then logs the run to MLflow: params,
the data card and split hashes, dev metrics per epoch (epoch 0 is the base model), the
best epoch's dev scores with the eval harness's plots of them, and the adapter itself as
plain artifacts with its self-description. The adapter is registered as a new version of
`phishgate-<task>` with the alias `challenger`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

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
from phishgate.training.sft import DEV_SCORES, HISTORY, train_worker

Say = Callable[[str], None]
T = TypeVar("T")


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
    return (config.data_dir or settings.dataset_dir(config.task)).resolve()


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
    card = _card(data_dir)
    if card.get("prompt_version", PROMPT_VERSION) != PROMPT_VERSION:
        raise ConfigError(
            f"data_dir: {data_dir} was rendered with prompt {card['prompt_version']!r}, this "
            f"version renders {PROMPT_VERSION!r}; run `phishgate data prepare` again"
        )
    resolve_base_model(settings)  # ModelNotPrepared with the command to run
    return data_dir


def _card(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "card.json"
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def data_budget(data_dir: Path, settings: CoreSettings) -> int:
    """The token budget the split files were rendered with (their data card's), which the
    adapter records; the settings' budget for data without a card."""
    return int(_card(data_dir).get("max_input_tokens", settings.max_input_tokens))


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


def worker_threads(config: TrainConfig, settings: CoreSettings, *, on_ray: bool) -> int:
    """CPUs (and torch threads) per worker: the config's, else this machine's cores split
    between the workers when they run here, else 1 (a Ray cluster's own default)."""
    if config.cpus_per_worker:
        return config.cpus_per_worker
    if on_ray and settings.ray_address:
        return 1
    return max(1, (os.cpu_count() or 1) // config.num_workers)


def _best_checkpoint(checkpoints: Sequence[tuple[T, dict[str, Any]]]) -> tuple[T, dict[str, Any]]:
    """The (checkpoint, metrics) pair with the best dev F1; among ties the earlier epoch
    (less training, same quality)."""
    if not checkpoints:
        raise RuntimeError("training reported no checkpoint")
    checkpoint, best = max(
        checkpoints, key=lambda cm: (float(cm[1]["dev_f1"]), -int(cm[1]["epoch"]))
    )
    return checkpoint, dict(best)


def run_training(
    config: TrainConfig, settings: CoreSettings, *, say: Say = print, use_ray: bool = True
) -> TrainingOutcome:
    """Train, track and register one adapter; see the module docstring. `use_ray=False`
    runs the same worker loop in this process (one worker), e.g. to measure Ray's cost."""
    if not use_ray and config.num_workers != 1:
        raise ConfigError("num_workers: training without Ray runs exactly one worker")
    data_dir = check_before_work(config, settings)
    budget = data_budget(data_dir, settings)
    base = resolve_base_model(settings)
    started = time.perf_counter()
    if use_ray:
        from phishgate.training.ray_cluster import connect

        say(connect(settings))

    import mlflow

    client = mlflow_client(settings)
    experiment = experiment_id(client, settings)
    job = {
        "config": config.model_dump(mode="json"),
        "settings": settings.model_dump(mode="json"),
        "data_dir": str(data_dir),
        "threads": worker_threads(config, settings, on_ray=use_ray),
    }
    commit = git_commit()
    with mlflow.start_run(experiment_id=experiment, run_name=config.name) as run:
        mlflow.log_params(_flat("", config.model_dump(mode="json")))
        mlflow.log_params(
            {
                "base_model": base.short_id,
                "prompt_version": PROMPT_VERSION,
                "max_input_tokens": budget,
                "ray": use_ray,
                "threads_per_worker": job["threads"],
            }
        )
        mlflow.set_tags({"git_commit": commit, "task": config.task})
        for card in ("card.json", "card.md"):
            if (data_dir / card).is_file():
                mlflow.log_artifact(str(data_dir / card), artifact_path="data")
        staging = Path(tempfile.mkdtemp(prefix="phishgate-adapter-"))
        try:
            fit = _fit_on_ray if use_ray else _fit_in_process
            adapter_dir, best = fit(job, config, settings, run.info.run_id, staging)
            history = json.loads((adapter_dir / HISTORY).read_text())
            for record in history:
                mlflow.log_metrics(record["metrics"], step=record["epoch"])
            _log_dev_plots(adapter_dir, config, best, staging / "eval")
            dev_metrics = {k: float(v) for k, v in best.items() if k.startswith("dev_")}
            manifest = AdapterManifest(
                task=config.task,
                labels=get_task(config.task).labels,
                threshold=float(best["threshold"]),
                prompt_version=PROMPT_VERSION,
                max_input_tokens=budget,
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


def _log_dev_plots(
    adapter_dir: Path, config: TrainConfig, best: dict[str, Any], out_dir: Path
) -> None:
    """Move the best epoch's dev scores out of the adapter folder into the run's `eval/`
    artifacts, with the eval harness's plots of them."""
    import mlflow
    import numpy as np

    from phishgate.training.plots import write_plots

    scores_file = adapter_dir / DEV_SCORES
    dev = json.loads(scores_file.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(scores_file, out_dir / DEV_SCORES)
    labels = get_task(config.task).labels
    write_plots(
        np.array(dev["truth"]),
        np.array(dev["scores"]),
        float(best["threshold"]),
        (labels[0], labels[-1]),
        f"{config.name}, dev, epoch {int(best['epoch'])}",
        out_dir,
    )
    mlflow.log_artifacts(str(out_dir), artifact_path="eval")


def _fit_on_ray(
    job: dict[str, Any], config: TrainConfig, settings: CoreSettings, run_id: str, staging: Path
) -> tuple[Path, dict[str, Any]]:
    """Run `train_worker` on Ray Train; the best epoch's adapter folder and its metrics."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from phishgate.training.ray_cluster import ray_state_dir

    # Ray Train's print patch logs every print() in the workers a second time, and also
    # what libraries print into a captured stdout (dill's disassembly when `datasets`
    # fingerprints a function). Ray passes this variable on to the controller and workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": job["threads"]},
        ),
        run_config=RunConfig(
            name=f"{config.name}-{run_id[:8]}",
            storage_path=config.storage_path or str(ray_state_dir(settings) / "results"),
            checkpoint_config=CheckpointConfig(
                checkpoint_score_attribute="dev_f1", checkpoint_score_order="max"
            ),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    checkpoint, best = _best_checkpoint(result.best_checkpoints or [])
    return Path(checkpoint.to_directory(str(staging / "adapter"))), best


class _LocalReporter:
    """Keeps a copy of every checkpoint folder reported, with its metrics."""

    rank = 0
    world_size = 1

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.checkpoints: list[tuple[Path, dict[str, Any]]] = []

    def report(self, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if checkpoint is not None:
            copy = self.folder / f"epoch-{int(metrics['epoch'])}"
            shutil.copytree(checkpoint, copy)
            self.checkpoints.append((copy, dict(metrics)))


def _fit_in_process(
    job: dict[str, Any], config: TrainConfig, settings: CoreSettings, run_id: str, staging: Path
) -> tuple[Path, dict[str, Any]]:
    """`train_loop` in this process, without Ray; same result as `_fit_on_ray`."""
    from phishgate.training.sft import train_loop

    reporter = _LocalReporter(staging)
    train_loop(job, reporter)
    return _best_checkpoint(reporter.checkpoints)
