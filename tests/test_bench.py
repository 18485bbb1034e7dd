"""The benchmark harness: cost arithmetic, FLOP count, payloads, interceptor, report writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from phishgate.bench.baseline import BaselineResult, Rate, parse_label
from phishgate.bench.cost import (
    ApiPrice,
    HardwareProfile,
    Profiles,
    Step,
    api_cost_per_email,
    cost_per_request,
    cost_rows,
    load_profiles,
    sustained_step,
)
from phishgate.bench.grpc_client import ReportingInterceptor
from phishgate.bench.limit import (
    Limit,
    MatmulRate,
    ModelShape,
    block_params,
    measure_matmul_rate,
    physical_limit,
    scoring_flops,
)
from phishgate.bench.load import LoadResult
from phishgate.bench.payloads import api_token_counts, load_payload_set, write_payloads
from phishgate.bench.report import ReportInputs, write_report
from phishgate.bench.settings import DEFAULT_PROFILES
from phishgate.core.errors import ConfigError
from phishgate.core.tasks import get_task
from phishgate.v1 import classifier_pb2, classifier_pb2_grpc
from tests.conftest import PHISHING_TEMPLATES, synthetic_email


def step(users: int, rps: float, p95: float, failures: int = 0, requests: int = 100) -> Step:
    return Step(users, requests, failures, rps, p95 / 2, p95, p95 * 1.5, p95 / 2)


PROFILES = Profiles(
    local="cpu",
    hardware={
        "cpu": HardwareProfile(description="test CPU", kind="cpu", dollars_per_hour=0.36),
        "gpu": HardwareProfile(description="test GPU", kind="gpu", dollars_per_hour=3.6),
    },
    hosted_api=ApiPrice(name="api", input_per_million=0.15, output_per_million=0.60),
)


# --- cost arithmetic -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dollars_per_hour", "rps", "expected"),
    [
        (0.36, 1.0, 0.0001),
        (3.6, 10.0, 0.0001),
        (0.1008, 2.0, 0.000014),
        (4.54, 100.0, 0.000012611111111111111),
    ],
)
def test_cost_per_request(dollars_per_hour: float, rps: float, expected: float) -> None:
    assert cost_per_request(dollars_per_hour, rps) == pytest.approx(expected, rel=1e-12)


def test_cost_per_request_needs_throughput() -> None:
    with pytest.raises(ValueError, match="positive"):
        cost_per_request(1.0, 0.0)


@pytest.mark.parametrize(
    ("input_tokens", "output_tokens", "expected"),
    [
        (1000, 10, 0.000156),  # 1000 * 0.15e-6 + 10 * 0.60e-6
        (400, 8, 0.0000648),
        (0, 0, 0.0),
        (1_000_000, 0, 0.15),
    ],
)
def test_api_cost_per_email(input_tokens: float, output_tokens: float, expected: float) -> None:
    price = PROFILES.hosted_api
    assert api_cost_per_email(input_tokens, output_tokens, price) == pytest.approx(
        expected, rel=1e-12, abs=1e-18
    )


@pytest.mark.parametrize(
    ("steps", "budget", "expected_users"),
    [
        ([step(1, 2.0, 300), step(8, 5.0, 450), step(32, 6.0, 2000)], 500, 8),
        ([step(1, 2.0, 300), step(8, 5.0, 450, failures=1)], 500, 1),  # failures disqualify
        ([step(1, 2.0, 600), step(8, 5.0, 900)], 500, None),
        ([step(1, 2.0, 500)], 500, 1),  # the budget itself is under the budget
        ([step(1, 0.0, 0, requests=0)], 500, None),  # nothing answered
        ([], 500, None),
    ],
)
def test_sustained_step(steps: list[Step], budget: float, expected_users: int | None) -> None:
    found = sustained_step(steps, budget)
    assert (found.users if found else None) == expected_users


def test_cost_rows() -> None:
    measured = {"cpu": [step(1, 2.0, 300), step(8, 4.0, 450), step(32, 9.0, 3000)]}
    rows = cost_rows(PROFILES, measured, 500, api_input_tokens=400, api_output_tokens=8)
    assert [r.option for r in rows] == ["cpu", "gpu", "api"]
    cpu, gpu, api = rows
    assert cpu.rps == 4.0
    assert cpu.per_request == pytest.approx(0.36 / 3600 / 4.0, rel=1e-12)
    assert cpu.per_million == pytest.approx(25.0, rel=1e-12)
    assert cpu.note == "8 users, p95 450 ms"
    assert (gpu.rps, gpu.per_million, gpu.note) == (None, None, "not measured")
    assert api.per_request == pytest.approx(0.0000648, rel=1e-12)
    assert api.per_million == pytest.approx(64.8, rel=1e-12)


def test_cost_rows_when_no_step_meets_the_budget() -> None:
    rows = cost_rows(PROFILES, {"gpu": [step(4, 10.0, 800)]}, 500, 100, 10)
    gpu = rows[1]
    assert gpu.per_million is None
    # best step at any latency: 3.6 $/h / (10 req/s * 3600) * 1e6 = $100 per million
    assert gpu.note == (
        "no step with p95 <= 500 ms and no failures; best 10.00 req/s at p95 800 ms "
        "($100.00 per million at that latency)"
    )


def test_shipped_profiles_load() -> None:
    profiles = load_profiles(DEFAULT_PROFILES)
    assert profiles.local in profiles.hardware
    assert {"cpu-2core", "l4", "h200"} <= set(profiles.hardware)
    assert profiles.hosted_api.input_per_million > 0


def test_bad_profiles_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "local: nowhere\nhardware:\n  cpu: {description: x, kind: cpu, dollars_per_hour: -1}\n"
        "hosted_api: {name: api, input_per_million: 1, output_per_million: 1}\n"
    )
    with pytest.raises(ConfigError, match="dollars_per_hour") as caught:
        load_profiles(path)
    assert str(path) in str(caught.value)


# --- the FLOP count and the limit ------------------------------------------------------


def test_flops_of_smollm2_135m_by_hand(prepared_model: Any) -> None:
    shape = ModelShape.from_checkpoint(prepared_model.path)
    assert shape == ModelShape(576, 1536, 30, 9, 3, 64, 49152)
    # Per block: q and o 576x576, k and v 576x192 (3 KV heads of 64), gate/up/down 576x1536.
    per_block = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert per_block == 3_538_944
    assert block_params(shape) == 30 * per_block == 106_168_320
    n = 400
    linear = 2 * 106_168_320 * n
    attention = 30 * 2 * (9 * 64) * n * (n + 1)  # QK^T and AV over i+1 keys for query i
    lm_head = 2 * 576 * 49152  # last position only
    assert scoring_flops(shape, n) == linear + attention + lm_head == 90_534_703_104
    assert scoring_flops(shape, n) / n / 1e9 == pytest.approx(0.2263, abs=1e-4)
    # A shared prefix of 70 tokens computed once: its linear layers and its own queries go.
    prefix_linear = 2 * 106_168_320 * (n - 70)
    prefix_attention = 30 * 2 * (9 * 64) * (n * (n + 1) - 70 * 71)
    assert scoring_flops(shape, n, 70) == prefix_linear + prefix_attention + lm_head
    with pytest.raises(ValueError, match="prefix_tokens"):
        scoring_flops(shape, 70, 70)


def test_block_params_match_the_checkpoint(prepared_model: Any) -> None:
    from safetensors import safe_open

    total = 0
    for file in prepared_model.path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if ".layers." in name and name.endswith("proj.weight"):
                    rows, cols = weights.get_slice(name).get_shape()
                    total += rows * cols
    shape = ModelShape.from_checkpoint(prepared_model.path)
    assert block_params(shape) == total


def test_physical_limit_arithmetic() -> None:
    shape = ModelShape(576, 1536, 30, 9, 3, 64, 49152)
    rate = MatmulRate(flops_per_s=1e11, size=1024, dtype="float32", threads=2, repeats=3)
    limit = physical_limit(rate, shape, [100, 300])
    mean_flops = (scoring_flops(shape, 100) + scoring_flops(shape, 300)) / 2
    assert limit.mean_flops_per_email == pytest.approx(mean_flops, rel=1e-12)
    assert limit.emails_per_s == pytest.approx(1e11 / mean_flops, rel=1e-12)
    assert limit.tokens_per_s == pytest.approx(limit.emails_per_s * 200, rel=1e-12)
    assert limit.whole_prompt_emails_per_s == pytest.approx(limit.emails_per_s, rel=1e-12)
    assert Limit.from_dict(json.loads(json.dumps(limit.to_dict()))) == limit

    reused = physical_limit(rate, shape, [100, 300], prefix_tokens=60)
    reused_flops = (scoring_flops(shape, 100, 60) + scoring_flops(shape, 300, 60)) / 2
    assert reused.emails_per_s == pytest.approx(1e11 / reused_flops, rel=1e-12)
    assert reused.tokens_per_s == pytest.approx(reused.emails_per_s * 200, rel=1e-12)
    assert reused.whole_prompt_emails_per_s == pytest.approx(limit.emails_per_s, rel=1e-12)
    assert Limit.from_dict(json.loads(json.dumps(reused.to_dict()))) == reused


def test_matmul_rate_is_measured() -> None:
    rate = measure_matmul_rate(size=128, repeats=2)
    assert rate.flops_per_s > 0
    assert (rate.size, rate.dtype, rate.repeats) == (128, "float32", 2)
    with pytest.raises(ConfigError, match="dtype"):
        measure_matmul_rate(size=128, repeats=1, dtype="float99")


# --- payloads and the naive baseline's parser -------------------------------------------


def test_write_payloads(tmp_path: Path, tokenizer: Any) -> None:
    task = get_task("phishing")
    sender, subject, body = (p.format(n=1) for p in PHISHING_TEMPLATES[0])
    messages = [
        ("a", "phishing", synthetic_email(sender, subject, body)),
        ("empty", "legitimate", b""),  # the renderer rejects it: left out
    ]
    written = write_payloads(messages, tmp_path, task, tokenizer, 256, "test")
    assert [p.id for p in written.payloads] == ["a"]
    payload = written.payloads[0]
    assert (tmp_path / payload.file).read_bytes() == messages[0][2]
    answer = tokenizer('{"label": "phishing"}', add_special_tokens=False)["input_ids"]
    assert payload.api_output_tokens == len(answer)
    assert 0 < payload.n_tokens <= 256
    assert load_payload_set(tmp_path) == written
    summary = written.summary()
    assert (summary["count"], summary["mean_api_output_tokens"]) == (1, len(answer))


def test_api_prompt_grows_with_the_email(tokenizer: Any) -> None:
    task = get_task("phishing")
    short, _ = api_token_counts(tokenizer, task, "Subject: hi", "phishing")
    long, _ = api_token_counts(tokenizer, task, "Subject: hi\n" + "word " * 100, "phishing")
    assert long - short >= 100


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"label": "phishing"}', "phishing"),
        ('Sure! {"label": "Legitimate"} is my answer', "legitimate"),
        ('{"label": "spam"}', None),
        ("phishing", None),
        ('{"label": "phish', None),
        ('{not json} {"label": "phishing"}', "phishing"),
    ],
)
def test_parse_label(text: str, expected: str | None) -> None:
    assert parse_label(text, ("legitimate", "phishing")) == expected


# --- the interceptor, against a real gRPC server ---------------------------------------


class _Classifier(classifier_pb2_grpc.ClassifierServicer):
    """Answers every message but an empty one, which gets INVALID_ARGUMENT."""

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.raw_message:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty message")
        return classifier_pb2.ClassifyResponse(request_id=request.request_id, label="phishing")


@pytest.fixture
def grpc_address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    classifier_pb2_grpc.add_ClassifierServicer_to_server(_Classifier(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_interceptor_reports_every_call(grpc_address: str) -> None:
    reports: list[dict[str, Any]] = []
    channel = grpc.intercept_channel(
        grpc.insecure_channel(grpc_address),
        ReportingInterceptor(lambda **event: reports.append(event)),
    )
    stub = classifier_pb2_grpc.ClassifierStub(channel)
    response = stub.Classify(classifier_pb2.ClassifyRequest(raw_message=b"x", request_id="r1"))
    with pytest.raises(grpc.RpcError):
        stub.Classify(classifier_pb2.ClassifyRequest(raw_message=b""))
    channel.close()

    assert [r["name"] for r in reports] == ["Classify", "Classify"]
    ok, failed = reports
    assert ok["exception"] is None
    assert ok["response_length"] == response.ByteSize() > 0
    assert ok["response_time"] > 0
    assert failed["exception"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed["response_length"] == 0
    assert {r["request_type"] for r in reports} == {"grpc"}


# --- the report writer -----------------------------------------------------------------


def _load(hardware: str, steps: list[Step]) -> LoadResult:
    payloads = {
        "count": 64,
        "source": "phishing/test (seed 0)",
        "mean_tokens": 400.0,
        "max_input_tokens": 512,
        "mean_api_input_tokens": 420.0,
        "mean_api_output_tokens": 8.0,
    }
    return LoadResult("127.0.0.1:1", hardware, 30, payloads, True, steps)


def test_report_writer(tmp_path: Path) -> None:
    load = _load("cpu", [step(1, 1.5, 400), step(8, 3.0, 480), step(32, 3.2, 2500)])
    limit = physical_limit(
        MatmulRate(2e11, 2048, "float32", 2, 10), ModelShape(576, 1536, 30, 9, 3, 64, 49152), [400]
    )
    baseline = BaselineResult(
        model="zero-shot m",
        emails=8,
        mean_tokens=400,
        max_new_tokens=24,
        generate=Rate(8, 40.0),
        mean_generated_tokens=12.0,
        unparsed=2,
        score_single=Rate(8, 4.0),
        score_batched=Rate(8, 2.0),
        batch_size=8,
        agreement=0.75,
        sample_answers=('{"label": "phishing"}',),
    )
    mail_flow = {"messages_per_s": 2.5, "sidecar_latency_ms": {"p50": 12.0, "p95": 30.5}}
    inputs = ReportInputs(
        profiles=PROFILES,
        p95_budget_ms=500,
        load=load,
        limit=limit,
        baseline=baseline,
        mail_flow=mail_flow,
    )
    files = write_report(inputs, tmp_path)

    assert {p.name for p in files.plots} == {"throughput.png", "latency.png", "cost.png"}
    for plot in files.plots:
        assert plot.read_bytes().startswith(b"\x89PNG")
    md = files.markdown.read_text()
    assert "| 8 | 100 | 0 | 3.00 | 1200 | 240 | 480 | 720 |" in md
    assert "Sustained at p95 <= 500 ms: 3.00 req/s with 8 users." in md
    # cpu: 0.36 $/h / (3 req/s * 3600 s) = $3.33e-05 per request, $33.33 per million
    assert "| 0.36 | 3.00 | 3.33e-05 | 33.33 | 8 users, p95 480 ms |" in md
    assert "not measured" in md.split("| gpu (test GPU)")[1].splitlines()[0]
    # api: 420 * 0.15e-6 + 8 * 0.60e-6 = $6.78e-05 per email
    assert "| 6.78e-05 | 67.80 |" in md
    assert "- cpu: 2.0x cheaper than api" in md
    assert f"| best possible emails/s | {limit.emails_per_s:.2f} |" in md
    assert f"| fraction of the limit | {3.2 / limit.emails_per_s:.1%} |" in md
    assert "| generate() + parse JSON, one email at a time | 0.20 | 1.0x |" in md
    assert "| one forward pass, length-sorted batches of 8 | 4.00 | 20.0x |" in md
    assert "| sidecar_latency_ms.p95 | 30.5 |" in md
    assert "| messages_per_s | 2.5 |" in md

    summary = json.loads(files.json.read_text())
    assert summary["fraction_of_limit"] == pytest.approx(3.2 / limit.emails_per_s)
    assert [row["option"] for row in summary["cost"]] == ["cpu", "gpu", "api"]


def test_report_with_a_measured_gpu_and_nothing_else(tmp_path: Path) -> None:
    gpu = _load("gpu", [step(64, 360.0, 90)])
    files = write_report(
        ReportInputs(profiles=PROFILES, p95_budget_ms=500, measured={"gpu": gpu}), tmp_path
    )
    md = files.markdown.read_text()
    # gpu: 3.6 $/h / (360 req/s * 3600 s) * 1e6 = $2.78 per million
    assert "| 3.6 | 360.00 | 2.78e-06 | 2.78 | 64 users, p95 90 ms |" in md
    assert "not measured" in md.split("| cpu (test CPU)")[1].splitlines()[0]
    assert "Not measured: run `phishgate bench limit`." in md
    assert "Not measured: pass the mail-flow benchmark's JSON" in md


# --- the CLI, as a user runs it --------------------------------------------------------


def _phishgate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("phishgate")), *map(str, args)]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_cli_bench_report(tmp_path: Path) -> None:
    gpu = _load("h200", [step(64, 360.0, 90)])
    (tmp_path / "h200.json").write_text(json.dumps(gpu.to_dict()))
    mail_flow = tmp_path / "mail-flow.json"
    mail_flow.write_text(json.dumps({"messages_per_s": 1.25}))
    result = _phishgate(
        "bench", "report", tmp_path, "--measured", f"h200={tmp_path / 'h200.json'}",
        "--mail-flow", mail_flow, "--p95-budget-ms", "100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "report.md").read_text()
    assert "| 4.54 | 360.00 |" in md  # the shipped profiles' H200 price
    assert "| messages_per_s | 1.25 |" in md
    assert (tmp_path / "cost.png").is_file()


def test_cli_bench_report_rejects_an_unknown_profile(tmp_path: Path) -> None:
    result = _phishgate("bench", "report", tmp_path, "--measured", "tpu=x.json")
    assert result.returncode == 78  # EX_CONFIG
    assert "unknown hardware profile(s) tpu" in result.stderr
