"""Training configuration: a YAML file, overridable from the command line.

Variants are YAML files under training/configs/, not forked scripts. Unknown keys and
impossible values fail before any work starts, with the field named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from phishgate.core.config_files import describe_validation_error, read_yaml_mapping
from phishgate.core.errors import ConfigError
from phishgate.core.tasks import TASKS


class LoraConfig(BaseModel):
    """The LoRA adapter: rank, scaling, dropout, and where it is applied."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, gt=0, le=256, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Module names inside each decoder layer that get LoRA weights.",
    )
    top_layers: int | None = Field(
        None,
        gt=0,
        description=(
            "Apply LoRA to the last N decoder layers only (None: all). The frozen layers "
            "below then need no backward pass."
        ),
    )


class TrainConfig(BaseModel):
    """One training job: which data, which adapter, how long, where it runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("custom", description="Config name, recorded in MLflow.")
    task: str = Field("phishing", description="Task whose labels the adapter predicts.")
    data_dir: Path | None = Field(
        None, description="Prepared split folder; default <home>/data/<task>."
    )
    max_train_examples: int | None = Field(
        None, gt=0, description="Stratified, seeded sample of the train split (None: all)."
    )
    max_eval_examples: int | None = Field(
        None, gt=0, description="Sample of dev used for the per-epoch eval (None: all)."
    )
    epochs: int = Field(1, gt=0, le=100)
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0)
    batch_size: int = Field(8, gt=0, description="Examples per device per step.")
    gradient_accumulation: int = Field(1, gt=0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    lora: LoraConfig = Field(default_factory=LoraConfig)
    num_workers: int = Field(1, gt=0, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker (CUDA required).")
    quantize_4bit: bool = Field(
        False, description="QLoRA: load the base model in 4 bits with bitsandbytes (CUDA only)."
    )
    cpus_per_worker: int | None = Field(
        None,
        gt=0,
        description="CPUs Ray reserves for each worker, and torch's threads there. None: "
        "this machine's cores divided by num_workers (local Ray), 1 on a cluster.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Base-model weights while training (LoRA weights stay float32). auto: "
        "bfloat16 on CUDA or a CPU with AMX or AVX512-BF16 (what serving uses there), "
        "else float32.",
    )
    cache_frozen_layers: bool = Field(
        True,
        description="With lora.top_layers: run the frozen layers below once per example and "
        "keep their output in memory, instead of in every step of every epoch.",
    )
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding)."
    )
    storage_path: str | None = Field(
        None,
        description="Ray Train storage for checkpoints (shared storage on a cluster); "
        "default <home>/ray/results.",
    )
    register_version: bool = Field(
        True, description="Register the best adapter as a new version with alias `challenger`."
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task {value!r}; known: {', '.join(sorted(TASKS))}")
        return value


def parse_override(spec: str) -> tuple[list[str], Any]:
    """`lora.r=16` -> (["lora", "r"], 16); the value is parsed as YAML."""
    key, sep, value = spec.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {spec!r} is not key=value (e.g. epochs=2, lora.r=16)")
    return key.strip().split("."), yaml.safe_load(value)


def load_train_config(
    path: Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """The config in `path` (defaults when None) with `key=value` overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "training config")
        data.setdefault("name", path.stem)
    for spec in overrides:
        keys, value = parse_override(spec)
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {spec!r}: {key} is not a section")
        target[keys[-1]] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"invalid training config{where}: {describe_validation_error(exc)}"
        ) from None
