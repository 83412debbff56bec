"""`neuronserve health`: one grpc.health.v1 Check, for a container HEALTHCHECK (Docker has no gRPC probe)
and for Kubernetes exec probes of a TLS server (its native gRPC probes speak plaintext only).

Exit 0 when the service is SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout), with one line on
stderr; 2 for a bad flag (a --tls file that cannot be read, --timeout-s <= 0). Address: --address, else 127.0.0.1:$NEURONSERVE_PORT (8001).
Service "" is the server overall. --tls-ca checks over TLS, --tls-cert/--tls-key add a client certificate.
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
    tls = parser.add_argument_group("TLS (a server started with --tls-cert)")
    tls.add_argument("--tls-ca", default=None, help="PEM CA certificates the server's certificate must chain to")
    tls.add_argument("--tls-cert", default=None, help="PEM client certificate (a server with --tls-client-ca)")
    tls.add_argument("--tls-key", default=None, help="its unencrypted PEM private key")
    tls.add_argument(
        "--tls-server-name",
        default=None,
        help="the name the server's certificate must carry (default: the address's host)",
    )
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = args.address or f"127.0.0.1:{os.environ.get('NEURONSERVE_PORT') or 8001}"
    try:
        if not args.timeout_s > 0:
            raise ValueError(f"--timeout-s must be > 0, got {args.timeout_s}")
        credentials = _credentials(args)
    except (OSError, ValueError) as exc:
        print(f"neuronserve health: {exc}", file=sys.stderr)
        return 2
    options = [] if args.tls_server_name is None else [("grpc.ssl_target_name_override", args.tls_server_name)]
    try:
        with (
            grpc.insecure_channel(address)
            if credentials is None
            else grpc.secure_channel(address, credentials, options=options)
        ) as channel:
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


def _credentials(args: argparse.Namespace):
    """grpc.ChannelCredentials from the --tls flags, or None (plaintext) when none is given."""
    import grpc

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (a client certificate and its key)")
    if args.tls_ca is None and args.tls_cert is None and args.tls_server_name is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("--tls-ca", args.tls_ca),
        private_key=_read("--tls-key", args.tls_key),
        certificate_chain=_read("--tls-cert", args.tls_cert),
    )


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"{flag} {path}: cannot read: {exc.strerror}") from None
