"""The classifier gRPC service: a real server on port 0, the real base model, real adapters
from a SQLite MLflow registry, called through the generated stub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from phishgate.classifier.app import (
    REGISTRY_HEALTH,
    SERVICE_NAME,
    RunningClassifier,
    resolve_engine,
    start,
)
from phishgate.classifier.settings import ClassifierSettings
from phishgate.core.tasks import PROMPT_VERSION, get_task
from phishgate.v1 import classifier_pb2 as pb
from phishgate.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import (
    LEGITIMATE_TEMPLATES,
    PHISHING_TEMPLATES,
    make_adapter_registry,
    synthetic_email,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CHAMPION = "models:/phishgate-phishing@champion"
CHALLENGER = "models:/phishgate-phishing@challenger"
MAX_BYTES = 64 * 1024


def emails(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        templates = PHISHING_TEMPLATES if i % 2 else LEGITIMATE_TEMPLATES
        sender, subject, body = (part.format(n=500 + i) for part in templates[i % 2])
        out.append(synthetic_email(sender, subject, body + " Thanks." * i))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(
    tmp_path_factory: pytest.TempPathFactory,
    prepared_model: Any,
    trained_adapters: tuple[Path, Path],
) -> AsyncIterator[tuple[RunningClassifier, Any]]:
    """phishing = @champion (v1) with @challenger (v2) as shadow; local = the second folder."""
    home = tmp_path_factory.mktemp("classifier") / "home"
    core, _ = make_adapter_registry(home, prepared_model, trained_adapters)
    settings = ClassifierSettings(
        port=0,
        metrics_port=0,
        adapters={"phishing": CHAMPION, "local": str(trained_adapters[1])},
        shadow={"phishing": CHALLENGER},
        max_message_bytes=MAX_BYTES,
        max_batch_size=8,
        max_wait_ms=20,
        refresh_interval_s=0,
    )
    running = await start(settings, core)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close(None)
    await running.stop(1)


def stub(served: tuple[RunningClassifier, Any]) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(served[1])


async def test_scores_equal_the_reference_scorer_with_that_adapter(
    served: Any, prepared_model: Any, tokenizer: Any, trained_adapters: tuple[Path, Path]
) -> None:
    from peft import PeftModel

    from phishgate.core.model import load_causal_lm
    from phishgate.core.render import render_email
    from phishgate.core.scoring import TransformersScorer

    task = get_task("phishing")
    raws = emails(4)
    calls = [
        stub(served).Classify(pb.ClassifyRequest(raw_message=raw, request_id=f"q{i}"))
        for i, raw in enumerate(raws)
    ]
    responses = await asyncio.gather(*calls)
    model = PeftModel.from_pretrained(load_causal_lm(prepared_model.path), str(trained_adapters[0]))
    scorer = TransformersScorer(model.eval(), tokenizer, task)
    expected = scorer.score_batch([render_email(raw, task, tokenizer, 256) for raw in raws], 0.5)
    for i, (response, reference) in enumerate(zip(responses, expected, strict=True)):
        assert response.request_id == f"q{i}"
        assert response.label == reference.label
        assert response.score == pytest.approx(reference.score, abs=1e-4)
        scores = {s.label: s.score for s in response.scores}
        assert set(scores) == {"legitimate", "phishing"}
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= s <= 1.0 for s in scores.values())
        assert response.adapter == pb.AdapterRef(name="phishing", version="1", source=CHAMPION)
        assert response.threshold == pytest.approx(0.5)
        assert response.model_id == prepared_model.short_id
        assert response.prompt_version == PROMPT_VERSION
        assert response.input_tokens == reference.n_tokens and not response.truncated
        assert response.latency_ms > 0


async def test_list_adapters_names_versions_and_the_default(
    served: Any, trained_adapters: tuple[Path, Path]
) -> None:
    listed = (await stub(served).ListAdapters(pb.ListAdaptersRequest())).adapters
    by_name = {info.ref.name: info for info in listed}
    assert set(by_name) == {"phishing", "local"}  # the shadow challenger is not a name
    assert listed[0].ref.name == "phishing" and listed[0].is_default
    assert by_name["phishing"].ref.version == "1"
    assert list(by_name["phishing"].labels) == ["legitimate", "phishing"]
    assert by_name["phishing"].positive_label == "phishing"
    assert by_name["phishing"].metrics["steps"] == pytest.approx(2.0)
    assert by_name["local"].ref.source == str(trained_adapters[1])
    assert len(by_name["local"].ref.version) == 12  # content hash of a local folder
    response = await stub(served).Classify(
        pb.ClassifyRequest(raw_message=emails(1)[0], adapter="local")
    )
    assert response.adapter.name == "local"
    assert response.adapter.version == by_name["local"].ref.version


async def test_bad_input_gets_precise_status_codes(served: Any) -> None:
    cases = [
        (b"", "", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (b"\x00\x01\xfe\xff" * 50, "", grpc.StatusCode.INVALID_ARGUMENT, "not an RFC 822"),
        (b"Subject: x\r\n\r\n" + b"a" * (MAX_BYTES + 10), "", grpc.StatusCode.INVALID_ARGUMENT,
         f"limit is {MAX_BYTES} bytes"),
        (emails(1)[0], "no-such-tenant", grpc.StatusCode.NOT_FOUND, "no-such-tenant"),
    ]  # fmt: skip
    for raw, adapter, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(served).Classify(pb.ClassifyRequest(raw_message=raw, adapter=adapter))
        assert caught.value.code() == code
        assert words in (caught.value.details() or "")
        assert "Traceback" not in (caught.value.details() or "")


async def test_a_passed_deadline_is_deadline_exceeded(served: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(served).Classify(pb.ClassifyRequest(raw_message=emails(1)[0]), timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_the_stream_answers_every_request_and_survives_bad_ones(served: Any) -> None:
    raws = emails(3)
    requests = [
        pb.ClassifyRequest(raw_message=raws[0], request_id="a"),
        pb.ClassifyRequest(raw_message=b"", request_id="bad"),
        pb.ClassifyRequest(raw_message=raws[1], request_id="b", adapter="missing"),
        pb.ClassifyRequest(raw_message=raws[2], request_id="c", adapter="local"),
    ]

    async def produce() -> AsyncIterator[pb.ClassifyRequest]:
        for request in requests:
            yield request

    answers = {r.request_id: r async for r in stub(served).ClassifyStream(produce())}
    assert set(answers) == {"a", "bad", "b", "c"}
    assert answers["a"].WhichOneof("outcome") == "result"
    assert answers["a"].result.adapter.version == "1"
    assert answers["bad"].error.code == "INVALID_ARGUMENT"
    assert answers["b"].error.code == "NOT_FOUND"
    assert answers["c"].result.adapter.name == "local"


async def test_shadow_scores_in_the_same_batch_and_concurrent_calls_share_passes(
    served: Any,
) -> None:
    running: RunningClassifier = served[0]
    registry = running.metrics.registry
    before = (
        registry.get_sample_value(
            "phishgate_classifier_shadow_decisions_total", {"adapter": "phishing", "agree": "true"}
        )
        or 0.0
    )
    batches_before = registry.get_sample_value("phishgate_classifier_batch_rows_count") or 0.0
    rows_before = registry.get_sample_value("phishgate_classifier_batch_rows_sum") or 0.0
    calls = [stub(served).Classify(pb.ClassifyRequest(raw_message=raw)) for raw in emails(8)]
    responses = await asyncio.gather(*calls)
    assert {r.adapter.version for r in responses} == {"1"}  # the champion decides
    agreed = (
        registry.get_sample_value(
            "phishgate_classifier_shadow_decisions_total", {"adapter": "phishing", "agree": "true"}
        )
        or 0.0
    )
    disagreed = (
        registry.get_sample_value(
            "phishgate_classifier_shadow_decisions_total", {"adapter": "phishing", "agree": "false"}
        )
        or 0.0
    )
    assert agreed + disagreed - before == 8
    batches = (registry.get_sample_value("phishgate_classifier_batch_rows_count") or 0.0) - (
        batches_before
    )
    rows = (registry.get_sample_value("phishgate_classifier_batch_rows_sum") or 0.0) - rows_before
    assert rows == 16  # champion + challenger per request
    assert batches < 8  # requests shared forward passes
    ok = registry.get_sample_value(
        "phishgate_classifier_requests_total", {"adapter": "phishing", "code": "OK"}
    )
    assert ok is not None and ok >= 8


async def test_health_auth_and_zero_shot(
    tmp_path: Path, prepared_model: Any, core_settings: Any
) -> None:
    """NOT_SERVING while loading, SERVING when ready, NOT_SERVING on stop; bearer tokens;
    no adapter configured: the zero-shot base model."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# security tools\ns3cret-token\n")
    settings = ClassifierSettings(port=0, metrics_port=0, auth_tokens_file=tokens)
    running = await start(settings, core_settings, wait_ready=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        good = (("authorization", "Bearer s3cret-token"),)
        classifier = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(raw_message=emails(1)[0])
        with pytest.raises(grpc.aio.AioRpcError) as loading:
            await classifier.Classify(request, metadata=good)
        assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
        await running.ready()
        for service in ("", SERVICE_NAME, REGISTRY_HEALTH):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        refused = [None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)]
        for metadata in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await classifier.Classify(request, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = await classifier.Classify(request, metadata=good)
        assert response.adapter.version == "zero-shot"
        assert response.label in ("legitimate", "phishing")
        listed = (await classifier.ListAdapters(pb.ListAdaptersRequest(), metadata=good)).adapters
        assert len(listed) == 1 and listed[0].is_default
        assert "zero-shot" in listed[0].ref.source and listed[0].ref.name == "phishing"

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.stop(1))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
    finally:
        await running.stop(1)
        await channel.close(None)


@pytest.mark.parametrize(
    ("setting", "vllm_installed", "engine"),
    [
        ("auto", True, "vllm"),
        ("auto", False, "transformers"),
        ("transformers", True, "transformers"),
        ("vllm", False, "vllm"),  # asked for: the engine's own clear error says what is missing
    ],
)
def test_engine_setting_auto_picks_vllm_where_installed(
    setting: str, vllm_installed: bool, engine: str
) -> None:
    assert resolve_engine(setting, vllm_installed) == engine
    assert ClassifierSettings().engine == "auto"
