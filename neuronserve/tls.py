"""gRPC transport settings of a serving process: TLS credentials (--tls-cert, --tls-key, --tls-client-ca)
and the connection options (keepalive, --max-connection-age-s, --max-pending-rpcs).

The PEM files are read once at start-up and checked with the standard library's ssl module before grpc
gets their bytes (grpc itself takes a bad file and then fails every handshake): an unreadable file, one
that is not PEM, an encrypted key, a key that does not match the certificate are one-line ConfigErrors
naming the flag. Certificates are not reloaded: rotate them by restarting (a rolling restart, with the
drain delay and grace period, loses nothing).
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass

from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError

# Keepalive, as stated in the README. The server pings a connection that has been silent for 60 s (even
# one with no call in flight) and closes it when the ping is not answered within 20 s, so a client gone
# without a FIN (a node lost) does not hold its connection for grpc's default 2 hours. Clients may ping
# as often as every 10 s, calls or not (grpc's default, 5 min without calls, answers a client keepalive
# of e.g. 30 s with GOAWAY "too_many_pings"); a third ping sooner than that is a strike too many: GOAWAY.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
)
_MAX_MS = 2**31 - 1  # grpc's integer options are 32-bit
# The core's bound on calls not yet picked up arrived in grpcio 1.60 (grpc/grpc#34809); older ones ignore it
PENDING_BOUND_SINCE = (1, 60)

log = logging.getLogger(__name__)


def _ms(seconds: float) -> int:
    return max(0, min(int(round(seconds * 1000)), _MAX_MS))


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """grpc server options for keepalive, connection ageing and the queue of calls not yet picked up.
    With --max-connection-age-s, each connection gets GOAWAY after about that long (grpc adds +-10%
    jitter) and its calls in flight get the grace period to finish; the client reconnects, through its
    load balancer, to any replica. With --max-pending-rpcs N, grpc's core refuses every new call that
    finds N calls waiting for the event loop, cancelling it at once instead of letting it wait out its
    deadline there (a tail drop: gRPC's soft limit N and hard limit N + 1, so its random early detection
    between the two never fires; a wider band let the queue, and the wait, grow to 4N under overload)."""
    options = list(KEEPALIVE_OPTIONS)
    if config.max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(config.grace_period_s)),
        ]
    if config.max_pending_rpcs is not None:
        if grpc_version() < PENDING_BOUND_SINCE:
            log.warning(
                "--max-pending-rpcs has no effect: this grpcio predates gRPC's bound on calls waiting for the "
                "event loop (1.60), so past capacity calls wait out their deadlines in gRPC's queue"
            )
        options += [
            ("grpc.server.max_pending_requests", config.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", config.max_pending_rpcs + 1),
        ]
    return options


def grpc_version() -> tuple[int, int]:
    """grpcio's (major, minor). grpc is imported here, not at the top: the CLI sets GRPC_VERBOSITY before
    grpc-core first loads (serve.py), and this module loads before that."""
    import grpc

    major, minor = grpc.__version__.split(".")[:2]
    return int(major), int(minor)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes grpc serves with, read once and checked."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None  # mTLS: client certificates required and verified against these CAs

    @property
    def mode(self) -> str:
        return "mTLS (client certificates required)" if self.client_ca is not None else "TLS"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_tls(config: ServerConfig) -> TlsFiles | None:
    """None without --tls-cert (plaintext gRPC); else the checked PEM bytes. Raises a one-line
    ConfigError naming the flag whose file is missing, unreadable or wrong."""
    cert_path, key_path, ca_path = config.tls_cert, config.tls_key, config.tls_client_ca
    if cert_path is None:
        if key_path is not None:
            raise ConfigError("--tls-key needs --tls-cert (the certificate of that key)")
        if ca_path is not None:
            raise ConfigError(
                "--tls-client-ca needs --tls-cert and --tls-key: client certificates are verified only on a TLS port"
            )
        return None
    if key_path is None:
        raise ConfigError("--tls-cert needs --tls-key (the certificate's private key)")
    cert = _read("tls_cert", cert_path)
    key = _read("tls_key", key_path)
    client_ca = _read("tls_client_ca", ca_path) if ca_path is not None else None
    _check_certificates("tls_cert", cert_path, cert, "a PEM certificate")
    _check_key(cert_path, key_path, key)
    if ca_path is not None and client_ca is not None:
        _check_certificates("tls_client_ca", ca_path, client_ca, "PEM CA certificates")
    return TlsFiles(cert=cert, key=key, client_ca=client_ca)


def server_credentials(tls: TlsFiles):
    """grpc.ServerCredentials for `tls` (client certificates required when it has a client CA)."""
    import grpc

    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
    )


def _read(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"{_flag(name)} {path}: cannot read it ({exc.strerror or exc})") from None


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words on one line, without the source location."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", " ".join(str(exc).split()))


def _text(name: str, path: str, data: bytes, what: str) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{_flag(name)} {path}: not {what} (binary content; DER files must be converted to PEM)"
        ) from None


def _check_certificates(name: str, path: str, data: bytes, what: str) -> None:
    text = _text(name, path, data, what)
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError(f"{_flag(name)} {path}: not {what} (no '-----BEGIN CERTIFICATE-----' in it)")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise ConfigError(f"{_flag(name)} {path}: not {what} ({_reason(exc)})") from None


def _check_key(cert_path: str, key_path: str, data: bytes) -> None:
    text = _text("tls_key", key_path, data, "a PEM private key")
    if "PRIVATE KEY-----" not in text:
        raise ConfigError(f"--tls-key {key_path}: not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' in it)")
    encrypted: list[bool] = []

    def password() -> bytes:  # never prompt on a terminal: an encrypted key is refused
        encrypted.append(True)
        return b""

    if "ENCRYPTED" in text:
        encrypted.append(True)
    else:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=password)
            return
        except OSError as exc:  # ssl.SSLError included
            reason = _reason(exc) if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
            if not encrypted:
                if "KEY_VALUES_MISMATCH" in str(exc) or "values mismatch" in reason.lower():
                    raise ConfigError(
                        f"--tls-key {key_path}: does not match the certificate of --tls-cert {cert_path}"
                    ) from None
                raise ConfigError(
                    f"--tls-key {key_path}: cannot be used with --tls-cert {cert_path} ({reason})"
                ) from None
    raise ConfigError(
        f"--tls-key {key_path}: the key is encrypted; grpc needs an unencrypted PEM key (e.g. openssl pkey -in KEY -out PLAIN)"
    )
