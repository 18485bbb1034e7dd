"""Container health probe for a gRPC server: the standard grpc.health.v1 Check.

    python health_probe.py [--service NAME] [--timeout S] [--tls-ca PEM [--server-name N]]
                          [HOST:PORT]

Exit status 0 when the server answers SERVING, 1 for any other status, an RPC error or no
answer within the timeout. The address defaults to 127.0.0.1:50051 (the classifier). With
--tls-ca the channel uses TLS and verifies the server against that CA bundle (Kubernetes'
own grpc probes speak plaintext only); --server-name is the name the certificate must carry
when it differs from HOST (a probe on 127.0.0.1). Used by the images' HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    address: str,
    service: str,
    timeout: float,
    tls_ca: Path | None = None,
    server_name: str | None = None,
) -> str:
    """The serving status name the server reports for `service` (raises grpc.RpcError)."""
    if tls_ca is None:
        channel = grpc.insecure_channel(address)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="Service name; empty: the server.")
    parser.add_argument("--timeout", type=float, default=3.0, help="Seconds to wait.")
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA bundle: use TLS.")
    parser.add_argument("--server-name", default=None, help="Name on the server certificate.")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout, args.tls_ca, args.server_name)
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    if status != "SERVING":
        print(f"unhealthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
