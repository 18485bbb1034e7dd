"""Adapters follow the registry: live alias swaps under load, refused incompatible versions,
the cached version when the registry is down, and the `phishgate serve classifier` process
(health, graceful SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from phishgate.classifier.app import REGISTRY_HEALTH, start
from phishgate.classifier.settings import ClassifierSettings
from phishgate.core.adapters import MANIFEST
from phishgate.core.settings import CoreSettings
from phishgate.v1 import classifier_pb2 as pb
from phishgate.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, synthetic_email

pytestmark = pytest.mark.slow

CHAMPION = "models:/phishgate-phishing@champion"
EMAIL = synthetic_email(
    "IT Helpdesk <helpdesk@mail-quota7.example>",
    "Mailbox quota exceeded",
    "Your mailbox is full. Click https://mail-quota7.example/upgrade to keep receiving mail.",
)


def _settings(**overrides: Any) -> ClassifierSettings:
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "adapters": {"phishing": CHAMPION},
        "refresh_interval_s": 0,
        "max_wait_ms": 2,
    }
    return ClassifierSettings(**(values | overrides))


async def test_a_live_alias_swap_under_concurrent_calls_loses_nothing(
    registered_adapters: tuple[CoreSettings, Any],
) -> None:
    core, client = registered_adapters
    running = await start(_settings(refresh_interval_s=0.3), core)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.ClassifierStub(channel)
    seen: list[tuple[str, float]] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            try:
                response = await stub.Classify(pb.ClassifyRequest(raw_message=EMAIL))
                seen.append((response.adapter.version, response.score))
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)

    try:
        callers = [asyncio.create_task(caller()) for _ in range(4)]
        while len(seen) < 8:
            await asyncio.sleep(0.05)
        client.set_registered_model_alias("phishgate-phishing", "champion", "2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(v == "2" for v, _ in seen) < 8:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*callers)
        assert errors == []
        versions = [v for v, _ in seen]
        assert set(versions) == {"1", "2"}
        assert "1" not in versions[versions.index("2") + 12 :]  # no going back after the swap
        scores = {v: {round(s, 4) for vv, s in seen if vv == v} for v in ("1", "2")}
        assert scores["1"].isdisjoint(scores["2"])  # v2 really is the other adapter
        assert running.batcher is not None
        for _ in range(50):  # the old version is unloaded once its last call finished
            if running.batcher.engine.adapter_keys() == {"phishing@2"}:
                break
            await asyncio.sleep(0.1)
        assert running.batcher.engine.adapter_keys() == {"phishing@2"}
        listed = (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
        assert listed[0].ref.version == "2"
        swaps = running.metrics.registry.get_sample_value(
            "phishgate_classifier_adapter_swaps_total",
            {"adapter": "phishing", "outcome": "swapped"},
        )
        assert swaps == 1
    finally:
        stop.set()
        await channel.close(None)
        await running.stop(1)


async def test_an_incompatible_version_is_refused_and_the_old_one_keeps_serving(
    registered_adapters: tuple[CoreSettings, Any],
    trained_adapter: Path,
    tmp_path: Path,
) -> None:
    from phishgate.core.registry import experiment_id

    core, client = registered_adapters
    foreign = tmp_path / "foreign"
    shutil.copytree(trained_adapter, foreign)
    manifest = json.loads((foreign / MANIFEST).read_text())
    manifest["base_weights_hash"] = "0" * 64  # trained on some other base model
    (foreign / MANIFEST).write_text(json.dumps(manifest))
    run = client.create_run(experiment_id(client, core))
    client.log_artifacts(run.info.run_id, str(foreign), "adapter")
    version = client.create_model_version(
        "phishgate-phishing", source=f"{run.info.artifact_uri}/adapter", run_id=run.info.run_id
    ).version
    assert str(version) == "3"

    running = await start(_settings(), core)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    stub = pb_grpc.ClassifierStub(channel)
    try:
        client.set_registered_model_alias("phishgate-phishing", "champion", "3")
        await running.refresh_adapters()
        await running.refresh_adapters()  # refused once, logged once
        response = await stub.Classify(pb.ClassifyRequest(raw_message=EMAIL))
        assert response.adapter.version == "1"
        refused = running.metrics.registry.get_sample_value(
            "phishgate_classifier_adapter_swaps_total",
            {"adapter": "phishing", "outcome": "refused"},
        )
        assert refused == 1
        assert running.batcher is not None
        assert running.batcher.engine.adapter_keys() == {"phishing@1"}
        client.set_registered_model_alias("phishgate-phishing", "champion", "2")
        await running.refresh_adapters()  # a compatible move is still followed
        response = await stub.Classify(pb.ClassifyRequest(raw_message=EMAIL))
        assert response.adapter.version == "2"
    finally:
        await channel.close(None)
        await running.stop(1)


async def test_with_the_registry_down_the_cached_version_is_served_and_health_says_so(
    registered_adapters: tuple[CoreSettings, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    core, _ = registered_adapters
    first = await start(_settings(), core)  # resolves @champion once: the cache knows v1
    await first.stop(0)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = core.model_copy(update={"mlflow_tracking_uri": "http://127.0.0.1:9"})
    running = await start(_settings(), down)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        response = await pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(raw_message=EMAIL)
        )
        assert response.adapter.version == "1"
        listed = await pb_grpc.ClassifierStub(channel).ListAdapters(pb.ListAdaptersRequest())
        assert "cached" in listed.adapters[0].ref.source
        health = health_pb2_grpc.HealthStub(channel)
        registry = await health.Check(health_pb2.HealthCheckRequest(service=REGISTRY_HEALTH))
        assert registry.status == health_pb2.HealthCheckResponse.NOT_SERVING
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close(None)
        await running.stop(0)


async def test_the_serve_command_finishes_calls_in_flight_on_sigterm(
    registered_adapters: tuple[CoreSettings, Any], tmp_path: Path
) -> None:
    core, _ = registered_adapters
    env = {
        **os.environ,
        "PHISHGATE_HOME": str(core.home),
        "PHISHGATE_CLASSIFIER_PORT": "0",
        "PHISHGATE_CLASSIFIER_METRICS_PORT": "0",
        "PHISHGATE_CLASSIFIER_ADAPTERS": json.dumps({"phishing": CHAMPION}),
        "PHISHGATE_CLASSIFIER_MAX_BATCH_SIZE": "1",  # one call at a time: some stay in flight
        "PHISHGATE_CLASSIFIER_REFRESH_INTERVAL_S": "0",
        "PHISHGATE_CLASSIFIER_GRACE_S": "300",  # generous: this machine may be busy
    }
    stderr = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "phishgate"), "serve", "classifier"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 180)
        assert line.startswith("classifier listening on 127.0.0.1:"), line
        address = line.split()[-1]
        channel = grpc.aio.insecure_channel(address)

        async def requests() -> AsyncIterator[pb.ClassifyRequest]:
            for i in range(4):
                yield pb.ClassifyRequest(raw_message=EMAIL, request_id=f"r{i}")

        stream = pb_grpc.ClassifierStub(channel).ClassifyStream(requests())
        answers = [await stream.read()]
        process.send_signal(signal.SIGTERM)
        while (answer := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            answers.append(answer)
        assert sorted(a.request_id for a in answers) == [f"r{i}" for i in range(4)]
        assert all(a.WhichOneof("outcome") == "result" for a in answers)
        await channel.close(None)
        code = await asyncio.to_thread(process.wait, 60)
        assert code == 0
        lines = (tmp_path / "stderr.log").read_text().splitlines()
        logs = [json.loads(line) for line in lines if line.startswith("{")]
        messages = [record["message"] for record in logs]
        assert any(m.startswith("classifier listening on") for m in messages)
        assert any(record.get("request_id") == "r2" for record in logs)
        assert messages[-1] == "classifier stopped"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()
