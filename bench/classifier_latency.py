"""Classifier throughput and latency at a few concurrency levels, over real gRPC.

    nice .venv/bin/python bench/classifier_latency.py --seconds 5 --concurrency 1 8 32

Starts the classifier in-process on an ephemeral port (settings from PHISHGATE_* and
PHISHGATE_CLASSIFIER_*, e.g. PHISHGATE_CLASSIFIER_ADAPTERS for an adapter; the zero-shot
base model otherwise), or measures a running one with `--address HOST:PORT`. Each level
runs `--seconds` of closed-loop Classify calls from that many tasks over a set of
synthetic emails of mixed length; prints one line per level: emails/s, p50, p99 (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from phishgate.v1 import classifier_pb2 as pb
from phishgate.v1 import classifier_pb2_grpc as pb_grpc


def _emails(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        body = (
            f"Dear customer {i}, please verify your account at https://login{i}.example/verify "
            "before Friday or it will be suspended. " * (1 + i % 6)
        )
        out.append(
            f"From: Service <no-reply@bank{i}.example>\r\nSubject: Notice {i}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n".encode()
        )
    return out


async def _level(stub: pb_grpc.ClassifierStub, concurrency: int, seconds: float) -> str:
    emails = _emails(24)
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def user(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                await stub.Classify(pb.ClassifyRequest(raw_message=emails[i % len(emails)]))
                latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError:
                errors += 1
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(user(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    if not latencies:
        return f"concurrency {concurrency:3d}: no successful call ({errors} errors)"
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return (
        f"concurrency {concurrency:3d}: {len(ms) / elapsed:6.2f} emails/s  "
        f"p50 {statistics.median(ms):7.1f} ms  p99 {p99:7.1f} ms  "
        f"({len(ms)} calls, {errors} errors)"
    )


async def main(args: argparse.Namespace) -> None:
    running = None
    address = args.address
    if address is None:
        from phishgate.classifier.app import core_settings, start
        from phishgate.classifier.settings import load_settings

        settings = load_settings().model_copy(update={"port": 0, "metrics_port": 0})
        running = await start(settings, core_settings())
        address = f"127.0.0.1:{running.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        await stub.Classify(pb.ClassifyRequest(raw_message=_emails(1)[0]))  # warm-up
        for concurrency in args.concurrency:
            print(await _level(stub, concurrency, args.seconds), flush=True)
    if running is not None:
        await running.stop(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="HOST:PORT of a running classifier")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    asyncio.run(main(parser.parse_args()))
