"""Benchmark settings, read once from the environment (prefix PHISHGATE_BENCH_).

`phishgate bench load` passes the payload folder, adapter name and deadline to the locust
subprocess through these variables; the CLI options take their defaults from here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PROFILES = Path(__file__).resolve().parent / "profiles.yaml"


class BenchSettings(BaseSettings):
    """What the load generator sends, and the budgets the cost model judges by."""

    model_config = SettingsConfigDict(env_prefix="PHISHGATE_BENCH_", extra="ignore")

    payloads: Path = Field(
        Path("payloads"),
        description="Folder of *.eml files the locust user sends (one random file per call).",
    )
    adapter: str = Field(
        "", description="Logical adapter named in each Classify request; empty: the default."
    )
    deadline_s: float = Field(30.0, gt=0, description="gRPC deadline of each Classify call.")
    p95_budget_ms: float = Field(
        500.0, gt=0, description="Latency target: a load step counts when its p95 is under it."
    )
    profiles: Path = Field(
        DEFAULT_PROFILES, description="YAML of hardware $/hour and hosted-API token prices."
    )
