"""Mail-flow benchmark: messages/s through a private Postfix with and without the sidecar.

    .venv/bin/python -m phishgate.milter.bench --messages 8 --concurrency 4 \
        --out var/reports/mailflow.json

Starts an aiosmtpd sink, the classifier (`phishgate serve classifier`, zero-shot unless
PHISHGATE_CLASSIFIER_ADAPTERS says otherwise), a plain Postfix, then per mode the sidecar
and a Postfix that uses it (`smtpd_milters`, or `content_filter` with re-injection).
Through each it sends the same messages from ../shared/data (deliver-only policy, so every
message reaches the sink) and measures per message the time from SMTP submission to
arrival at the sink (one at a time), and the throughput with `concurrency` parallel
senders. The latency the sidecar adds is the difference of the medians
(`added_latency_ms_p50`); `scoring_ms_mean` (the sidecar's metrics) is the model's part.
The JSON it writes is what `phishgate bench report --mail-flow` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from phishgate.core.process import ServiceProcess
from phishgate.milter.postfix import PostfixConfig, PostfixInstance, free_port
from phishgate.milter.sink import MailSink

REPO = Path(__file__).resolve().parent.parent.parent


def _messages(data: Path, count: int) -> list[bytes]:
    """Half legitimate (blinux-list), half phishing (phishing_pot), CRLF line ends."""
    ham = sorted((data / "modern_ham" / "blinux-list" / "messages").glob("*.eml"))
    phishing = sorted((data / "phishing_pot" / "email").glob("*.eml"))
    paths = ham[: (count + 1) // 2] + phishing[: count // 2]
    return [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for p in paths]


def _run(
    port: int, sink: MailSink, messages: list[bytes], concurrency: int, health: int = 0
) -> dict[str, Any]:
    """Latency one message at a time, then throughput with `concurrency` senders."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"

    def one(i: int) -> float:
        to = f"m{i}-{tag}@bench.test"
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
            client.sendmail("bench@outside.example", [to], messages[i % len(messages)])
        deadline = started + 600
        while not sink.to(to):  # finer than MailSink.wait's 0.2 s polling
            if time.perf_counter() > deadline:
                raise TimeoutError(f"message {i} never arrived")
            time.sleep(0.005)
        return time.perf_counter() - started

    count = len(messages)
    latencies = [one(i) for i in range(count)]  # one at a time: latency
    scoring = _scoring_ms(health) if health else None  # the model's part of those
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:  # in parallel: throughput
        list(pool.map(lambda i: one(count + i), range(count)))
    wall = time.perf_counter() - started
    return {
        "messages": count,
        "latency_ms_mean": round(statistics.mean(latencies) * 1000, 1),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 1),
        "latency_ms_max": round(max(latencies) * 1000, 1),
        "messages_per_s": round(count / wall, 3),
        "concurrency": concurrency,
        **({"scoring_ms_mean": scoring} if scoring is not None else {}),
    }


def _listening(process: ServiceProcess) -> bool:
    return "listening on" in process.log.read_text()


def _scoring_ms(health_port: int) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = re.search(r"^phishgate_sidecar_scoring_seconds_sum (\S+)", text, re.M)
    count = re.search(r"^phishgate_sidecar_scoring_seconds_count (\S+)", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return None
    return round(float(total.group(1)) / float(count.group(1)) * 1000, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--modes", default="milter,smtp", help="sidecar modes to measure")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    messages = _messages(args.data, args.messages)
    root = Path(tempfile.mkdtemp(prefix="phishgate-bench-"))
    root.chmod(0o755)
    phishgate = str(Path(sys.executable).with_name("phishgate"))
    classifier_port = free_port()
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump({"thresholds": {"phishing": {"tag": 0.5}}}))
    classifier = ServiceProcess(
        [phishgate, "serve", "classifier"],
        dict(
            os.environ,
            PHISHGATE_CLASSIFIER_PORT=str(classifier_port),
            PHISHGATE_CLASSIFIER_METRICS_PORT="0",
            PHISHGATE_CLASSIFIER_LOG_FORMAT="text",
        ),
        root / "classifier.log",
        REPO,
    )
    result: dict[str, Any] = {}
    try:
        with MailSink() as sink, classifier:
            classifier.start(lambda: "classifier listening on" in classifier.log.read_text())
            plain = PostfixConfig(root / "plain", free_port(), ("127.0.0.1", sink.port))
            with PostfixInstance(plain) as postfix:
                result["postfix_only"] = _run(
                    postfix.config.smtpd_port, sink, messages, args.concurrency
                )
            for mode in args.modes.split(","):
                port, health, reinject = free_port(), free_port(), free_port()
                sidecar = ServiceProcess(
                    [phishgate, "serve", "milter", "--mode", mode],
                    dict(
                        os.environ,
                        PHISHGATE_MILTER_LISTEN_PORT=str(port),
                        PHISHGATE_MILTER_HEALTH_PORT=str(health),
                        PHISHGATE_MILTER_CLASSIFIER_ADDRESS=f"127.0.0.1:{classifier_port}",
                        PHISHGATE_MILTER_CLASSIFIER_TIMEOUT_MS="120000",
                        PHISHGATE_MILTER_POLICY_FILE=str(policy),
                        PHISHGATE_MILTER_NEXT_HOP=f"127.0.0.1:{reinject}",
                    ),
                    root / f"{mode}.log",
                    REPO,
                )
                config = PostfixConfig(root / mode, free_port(), ("127.0.0.1", sink.port))
                if mode == "milter":
                    config.milter = f"inet:127.0.0.1:{port}"
                    config.milter_content_timeout_s = 300
                else:
                    config.content_filter, config.reinject_port = ("127.0.0.1", port), reinject
                with sidecar, PostfixInstance(config) as postfix:
                    sidecar.start(partial(_listening, sidecar), 60)
                    run = _run(postfix.config.smtpd_port, sink, messages, args.concurrency, health)
                    alone = result["postfix_only"]
                    run["added_latency_ms_p50"] = round(
                        run["latency_ms_p50"] - alone["latency_ms_p50"], 1
                    )
                    # What the sidecar and the extra Postfix hop cost besides the model.
                    run["added_latency_ms_mean_without_scoring"] = round(
                        run["latency_ms_mean"] - alone["latency_ms_mean"] - run["scoring_ms_mean"],
                        1,
                    )
                    result[f"postfix_with_sidecar_{mode}"] = run
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
