"""`neuronserve health`: one grpc.health.v1 Check, for a container HEALTHCHECK (Docker has no gRPC probe).

Exit 0 when the service is SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout), with one line on
stderr. Address: --address, else 127.0.0.1:$NEURONSERVE_PORT (8001). Service "" is the server overall.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("health", help="check a server's grpc.health.v1 status (exit 0 when SERVING)")
    parser.add_argument(
        "--address", default=None, help="HOST:PORT (default 127.0.0.1:$NEURONSERVE_PORT, else 127.0.0.1:8001)"
    )
    parser.add_argument("--service", default="", help="service name to check ('' = the server overall)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check (default 3)")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = args.address or f"127.0.0.1:{os.environ.get('NEURONSERVE_PORT') or 8001}"
    try:
        with grpc.insecure_channel(address) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
                .status
            )
    except grpc.RpcError as exc:
        print(f"neuronserve health: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"neuronserve health: {address} {args.service or '(server)'}: {name}", file=sys.stderr)
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
