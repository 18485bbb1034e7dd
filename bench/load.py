"""The load sweep: locust, headless, against a classifier, one step per user count.

Each step is its own locust process (`bench/locustfile.py`) for a bounded time, with stats
reset once all users are running; its `--csv` stats give requests/s, latency percentiles
and failures. The sweep writes steps.csv and load.json into the output folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phishgate.bench.cost import Step
from phishgate.core.errors import ConfigError, EngineUnavailable

if TYPE_CHECKING:
    from phishgate.core.process import ServiceProcess

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
LISTENING = re.compile(r"classifier listening on (\S+:\d+)")
FEW_REQUESTS = 20
"""Fewer completed requests in a step than this make its percentiles meaningless."""
STEP_FIELDS = ("users", "requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms")

Say = Callable[[str], None]


@dataclass
class LoadResult:
    """A sweep: where it ran, what it sent, and one Step per user count."""

    address: str
    hardware: str
    step_seconds: int
    payloads: dict[str, Any]
    started_classifier: bool
    steps: list[Step] = field(default_factory=list)
    started_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "hardware": self.hardware,
            "step_seconds": self.step_seconds,
            "started_classifier": self.started_classifier,
            "started_at": self.started_at,
            "payloads": self.payloads,
            "steps": [asdict(step) for step in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadResult:
        return cls(
            address=str(data["address"]),
            hardware=str(data["hardware"]),
            step_seconds=int(data["step_seconds"]),
            payloads=dict(data["payloads"]),
            started_classifier=bool(data["started_classifier"]),
            steps=[Step.from_dict(row) for row in data["steps"]],
            started_at=str(data.get("started_at", "")),
        )


def read_load_result(path: Path) -> LoadResult:
    """A load.json written by `run_sweep`; ConfigError if unreadable."""
    try:
        return LoadResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a load result: {exc}") from None


def parse_locust_stats(path: Path, users: int) -> Step:
    """The Aggregated row of a locust `<prefix>_stats.csv` as a Step.

    ConfigError if the file or the row is missing. Percentiles are locust's (its response
    times are bucketed: to 10 ms above 100 ms, to 100 ms above 1 s).
    """
    try:
        with path.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as exc:
        raise ConfigError(f"no locust stats at {path}: {exc.strerror}") from None
    row = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if row is None:
        raise ConfigError(f"{path} has no Aggregated row")

    def number(key: str) -> float:
        value = row.get(key, "")
        return float(value) if value not in ("", "N/A") else 0.0

    return Step(
        users=users,
        requests=int(number("Request Count")),
        failures=int(number("Failure Count")),
        rps=number("Requests/s"),
        p50_ms=number("50%"),
        p95_ms=number("95%"),
        p99_ms=number("99%"),
        mean_ms=number("Average Response Time"),
    )


def run_step(
    address: str,
    users: int,
    seconds: int,
    csv_prefix: Path,
    env: Mapping[str, str],
    *,
    stop_timeout: float,
) -> Step:
    """One headless locust run of `users` users for `seconds` s; its aggregated stats.

    Calls still in flight at the end get up to `stop_timeout` s to finish and are counted
    (otherwise a step barely longer than one call would record nothing). EngineUnavailable
    if locust itself fails (not when calls fail: those are counted).
    """
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--reset-stats",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{seconds}s",
        "--host",
        address,
        "--csv",
        str(csv_prefix),
        "--stop-timeout",
        f"{stop_timeout:g}",
        "--exit-code-on-error",
        "0",
        "--loglevel",
        "WARNING",
    ]
    log = csv_prefix.with_suffix(".log")
    with log.open("wb") as stream:
        done = subprocess.run(
            command,
            env={**os.environ, **env},
            stdout=stream,
            stderr=subprocess.STDOUT,
            timeout=seconds + stop_timeout + 120,
            check=False,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise EngineUnavailable(f"locust exited with {done.returncode}: {tail}")
    return parse_locust_stats(Path(f"{csv_prefix}_stats.csv"), users)


def run_sweep(
    address: str,
    users: Sequence[int],
    seconds: int,
    payload_dir: Path,
    payload_summary: dict[str, Any],
    out_dir: Path,
    *,
    hardware: str,
    adapter: str = "",
    deadline_s: float = 30.0,
    started_classifier: bool = False,
    say: Say = lambda _line: None,
) -> LoadResult:
    """A locust step per entry of `users`; writes steps.csv and load.json under `out_dir`.

    `adapter` is named in every request; `deadline_s` is each call's gRPC deadline and how
    long calls in flight at the end of a step may take to finish.
    """
    if not users or any(n < 1 for n in users):
        raise ConfigError(f"user counts must be positive, got {list(users)}")
    if seconds < 1:
        raise ConfigError(f"step duration must be at least 1 s, got {seconds}")
    env = {
        "PHISHGATE_BENCH_PAYLOADS": str(payload_dir.resolve()),
        "PHISHGATE_BENCH_ADAPTER": adapter,
        "PHISHGATE_BENCH_DEADLINE_S": str(deadline_s),
    }
    result = LoadResult(
        address=address,
        hardware=hardware,
        step_seconds=seconds,
        payloads=payload_summary,
        started_classifier=started_classifier,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for count in users:
        say(f"{count} users for {seconds} s")
        prefix = out_dir / f"users-{count}"
        step = run_step(address, count, seconds, prefix, env, stop_timeout=deadline_s)
        result.steps.append(step)
        say(
            f"{count} users: {step.rps:.2f} req/s, p50 {step.p50_ms:g} ms, "
            f"p95 {step.p95_ms:g} ms, {step.failures} failures of {step.requests}"
        )
        if step.requests < FEW_REQUESTS:
            say(f"warning: {step.requests} requests in {seconds} s: use longer steps")
        write_load_result(result, out_dir)
    return result


def write_load_result(result: LoadResult, out_dir: Path) -> None:
    (out_dir / "load.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    with (out_dir / "steps.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=STEP_FIELDS)
        writer.writeheader()
        writer.writerows(asdict(step) for step in result.steps)


@contextlib.contextmanager
def classifier_process(
    log_path: Path, env: Mapping[str, str], *, timeout: float = 300.0
) -> Iterator[str]:
    """Run `phishgate serve classifier` on an ephemeral port; yield its HOST:PORT once it
    answers health checks as SERVING; stop it (SIGTERM, then SIGKILL) on exit.

    `env` is added to this process's environment (e.g. PHISHGATE_CLASSIFIER_ADAPTERS);
    its metrics endpoint is off unless `env` sets PHISHGATE_CLASSIFIER_METRICS_PORT.
    ServiceFailed, with the end of its log, if it exits or is not serving in time.
    """
    from phishgate.core.process import ServiceProcess

    command = [str(Path(sys.executable).with_name("phishgate")), "serve", "classifier"]
    # Metrics off unless asked: a second server on the default metrics port would not start.
    full_env = {
        **os.environ,
        "PHISHGATE_CLASSIFIER_METRICS_PORT": "0",
        **env,
        "PHISHGATE_CLASSIFIER_PORT": "0",
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)  # the service appends; the address must be this run's

    def address() -> str:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        match = LISTENING.search(text)
        return match.group(1) if match else ""

    with ServiceProcess(command, full_env, log_path) as service:
        service.start(lambda: bool(address()), timeout)
        _wait_serving(address(), service, timeout)
        yield address()


def _wait_serving(address: str, service: ServiceProcess, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from phishgate.core.process import ServiceFailed

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and service.running():
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise ServiceFailed(f"classifier at {address} is not serving:\n{service.log_tail()}")
