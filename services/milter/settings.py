"""Settings of the mail-flow sidecar, read once from the environment (prefix PHISHGATE_MILTER_).

The policy (thresholds, overrides, skip lists, fail mode) lives in a YAML file, see
`phishgate.milter.policy`; these settings say where to listen, where the classifier is, and
how long to wait for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "PHISHGATE_MILTER_"
DEFAULT_PORTS = {"milter": 8899, "smtp": 10024}


class MilterSettings(BaseSettings):
    """Where the sidecar listens and how it reaches the classifier."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    mode: Literal["milter", "smtp"] = Field(
        "milter",
        description="milter: for Postfix smtpd_milters; smtp: content filter with re-injection.",
    )
    listen_host: str = Field(
        "127.0.0.1",
        description="Address to listen on, or a Unix socket path (milter mode, starts with /).",
    )
    listen_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="TCP port; -1: 8899 in milter mode, 10024 in smtp mode; 0: an ephemeral port.",
    )
    next_hop: str = Field(
        "127.0.0.1:10025",
        description="smtp mode: HOST:PORT that filtered mail is re-injected to (Postfix smtpd).",
    )
    next_hop_timeout_s: float = Field(
        60.0, gt=0, description="smtp mode: timeout of each SMTP command to the next hop."
    )
    classifier_address: str = Field(
        "127.0.0.1:50051", description="HOST:PORT of the phishgate.v1.Classifier gRPC service."
    )
    classifier_timeout_ms: int = Field(
        10_000,
        ge=50,
        description=(
            "Deadline of one Classify call; keep it below the MTA's timeouts (Postfix "
            "milter_content_timeout 300 s, smtp_data_done_timeout 600 s)."
        ),
    )
    classifier_tls_ca: Path | None = Field(
        None, description="PEM CA bundle: talk TLS to the classifier (unset: plaintext)."
    )
    classifier_tls_cert: Path | None = Field(
        None, description="PEM client certificate for mutual TLS (with classifier_tls_key)."
    )
    classifier_tls_key: Path | None = Field(None, description="PEM key of classifier_tls_cert.")
    classifier_token: str = Field(
        "", description="Bearer token sent as `authorization` metadata (empty: none)."
    )
    progress_interval_ms: int = Field(
        5_000,
        ge=100,
        description="milter mode: send SMFIR_PROGRESS this often while waiting for the classifier.",
    )
    policy_file: Path | None = Field(
        None, description="Policy YAML (see policy.example.yaml); unset: the built-in defaults."
    )
    health_port: int = Field(
        9102, ge=0, le=65535, description="Port of /healthz and /metrics on listen_host; 0: off."
    )
    health_host: str = Field("127.0.0.1", description="Address of the health/metrics endpoint.")
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description=(
            "smtp mode: largest message accepted (552 5.3.4 above); keep it >= Postfix "
            "message_size_limit so the filter never refuses what Postfix queued."
        ),
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object per log line; text: human-readable."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the sidecar."
    )

    @model_validator(mode="after")
    def _pair_tls_files(self) -> MilterSettings:
        if (self.classifier_tls_cert is None) != (self.classifier_tls_key is None):
            raise ValueError("classifier_tls_cert and classifier_tls_key go together")
        return self

    @property
    def port(self) -> int:
        """The TCP port to listen on, the mode's default when listen_port is -1."""
        return DEFAULT_PORTS[self.mode] if self.listen_port == -1 else self.listen_port

    @property
    def unix_socket(self) -> Path | None:
        """The Unix socket path when listen_host names one."""
        return Path(self.listen_host) if self.listen_host.startswith("/") else None


def split_host_port(value: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"; ValueError when it is neither."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)
