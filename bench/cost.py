"""The cost model: measured throughput at a latency target -> $ per email, vs a hosted API.

Pure functions over load-test steps and prices. A hardware option costs its $/hour divided
by the requests it sustains per hour, where "sustains" means the best step of a load sweep
whose p95 latency is under the budget and that had no failures. The hosted API costs its
price per token times the tokens the same emails take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from phishgate.core.config_files import describe_validation_error, read_yaml_mapping
from phishgate.core.errors import ConfigError

PER_MILLION = 1_000_000
SECONDS_PER_HOUR = 3600


@dataclass(frozen=True)
class Step:
    """One step of a load sweep: `users` concurrent callers for a fixed duration."""

    users: int
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Step:
        return cls(
            users=int(row["users"]),
            requests=int(row["requests"]),
            failures=int(row["failures"]),
            rps=float(row["rps"]),
            p50_ms=float(row["p50_ms"]),
            p95_ms=float(row["p95_ms"]),
            p99_ms=float(row["p99_ms"]),
            mean_ms=float(row["mean_ms"]),
        )


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(description="What the machine is, e.g. 'AWS g6.xlarge (1x L4)'.")
    kind: Literal["cpu", "gpu"] = Field(description="cpu or gpu.")
    dollars_per_hour: float = Field(gt=0, description="On-demand price, USD per hour.")
    source: str = Field("", description="Where the price comes from.")


class ApiPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Hosted model, e.g. gpt-4o-mini.")
    input_per_million: float = Field(ge=0, description="USD per million input tokens.")
    output_per_million: float = Field(ge=0, description="USD per million output tokens.")
    source: str = Field("", description="Where the price comes from.")


class Profiles(BaseModel):
    """bench/profiles.yaml: the hardware options, which one this machine is, the API."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local: str = Field(description="The hardware profile `bench load` measures by default.")
    hardware: dict[str, HardwareProfile] = Field(min_length=1)
    hosted_api: ApiPrice

    @model_validator(mode="after")
    def _local_known(self) -> Profiles:
        if self.local not in self.hardware:
            raise ValueError(f"local profile {self.local!r} is not under hardware")
        return self


def load_profiles(path: Path) -> Profiles:
    """Validated profiles from YAML; ConfigError naming the file and the bad fields."""
    data = read_yaml_mapping(path, "profiles file")
    try:
        return Profiles.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"profiles file {path}: {describe_validation_error(exc)}") from None


def sustained_step(steps: Sequence[Step], p95_budget_ms: float) -> Step | None:
    """The step with the most requests/s among those with no failures and p95 <= budget."""
    fit = [s for s in steps if s.failures == 0 and s.requests > 0 and s.p95_ms <= p95_budget_ms]
    return max(fit, key=lambda s: s.rps, default=None)


def cost_per_request(dollars_per_hour: float, rps: float) -> float:
    """USD per request for a machine at `dollars_per_hour` serving `rps` requests/s."""
    if rps <= 0:
        raise ValueError(f"requests/s must be positive, got {rps}")
    return dollars_per_hour / (rps * SECONDS_PER_HOUR)


def api_cost_per_email(input_tokens: float, output_tokens: float, price: ApiPrice) -> float:
    """USD the hosted API bills for one email of that many input and output tokens."""
    return (
        input_tokens * price.input_per_million + output_tokens * price.output_per_million
    ) / PER_MILLION


@dataclass(frozen=True)
class CostRow:
    """One option of the cost table; numbers are None where nothing was measured."""

    option: str
    description: str
    dollars_per_hour: float | None
    rps: float | None
    per_request: float | None
    per_million: float | None
    note: str


def cost_rows(
    profiles: Profiles,
    measured: Mapping[str, Sequence[Step]],
    p95_budget_ms: float,
    api_input_tokens: float,
    api_output_tokens: float,
) -> list[CostRow]:
    """One row per hardware profile (in file order), then the hosted API.

    `measured` maps a profile name to the load steps measured on it; a profile without
    steps is "not measured", one whose steps all miss the budget says so.
    """
    rows = []
    for name, profile in profiles.hardware.items():
        steps = measured.get(name)
        step = sustained_step(steps, p95_budget_ms) if steps else None
        if step is None:
            note = _miss_note(profile, steps, p95_budget_ms) if steps else "not measured"
            rows.append(
                CostRow(name, profile.description, profile.dollars_per_hour, None, None, None, note)
            )
            continue
        per_request = cost_per_request(profile.dollars_per_hour, step.rps)
        rows.append(
            CostRow(
                option=name,
                description=profile.description,
                dollars_per_hour=profile.dollars_per_hour,
                rps=step.rps,
                per_request=per_request,
                per_million=per_request * PER_MILLION,
                note=f"{step.users} users, p95 {step.p95_ms:g} ms",
            )
        )
    api = profiles.hosted_api
    per_email = api_cost_per_email(api_input_tokens, api_output_tokens, api)
    rows.append(
        CostRow(
            option=api.name,
            description=f"hosted API, ${api.input_per_million:g} / ${api.output_per_million:g} "
            "per million input / output tokens",
            dollars_per_hour=None,
            rps=None,
            per_request=per_email,
            per_million=per_email * PER_MILLION,
            note=f"{api_input_tokens:.0f} input + {api_output_tokens:.0f} output tokens per email",
        )
    )
    return rows


def _miss_note(profile: HardwareProfile, steps: Sequence[Step], p95_budget_ms: float) -> str:
    """Why a measured profile has no cost, and what its best step would cost at any latency."""
    note = f"no step with p95 <= {p95_budget_ms:g} ms and no failures"
    best = sustained_step(steps, float("inf"))
    if best is None:
        return note
    per_million = cost_per_request(profile.dollars_per_hour, best.rps) * PER_MILLION
    return (
        f"{note}; best {best.rps:.2f} req/s at p95 {best.p95_ms:g} ms "
        f"(${per_million:,.2f} per million at that latency)"
    )
