"""gRPC over TLS and mTLS, reflection on/off, and a graceful exit in a cluster (--drain-delay-s,
--max-connection-age-s, keepalive).

Settings and bad certificate files first (unit tests), then `neuronserve serve` in subprocesses on loopback
with real grpc clients: TLS (a client trusting the CA is served; plaintext and a client trusting another CA
are refused), mTLS (a client without a certificate, or with one from an untrusted CA, is refused), a pool
whose shared and private ports are both TLS, connections aged by --max-connection-age-s, and SIGTERM with
a 2 s drain delay under load (health NOT_SERVING at once, requests still served during the delay, every
accepted request answered, exit 0), in one process and in a pool of two workers.

The certificates are made here with the openssl command line (the `cryptography` package is not installed):
a server CA and a server certificate for localhost / 127.0.0.1, a client CA and a client certificate, and a
stranger CA with a client certificate of its own.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import grpc
import pytest

from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError
from neuronserve.pool_stats import WORKER_SCOPE
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.settings import add_arguments, resolve_config
from neuronserve.tls import KEEPALIVE_OPTIONS, connection_options, load_tls
from test_server_e2e import score_request
from test_workers import WORKER_READY, Pool, poll

pytestmark = pytest.mark.timeout(120)

FEATURES = 16  # SMALL_CONFIG's user and peer features
LABELS = 3


# ---- certificates, made with the openssl command line ----------------------------------------------


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _new_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=neuronserve test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)


def _new_leaf(directory: Path, name: str, ca: str, serial: int, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions + "\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN=neuronserve test {name}", cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial", str(serial),
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make the test certificates")
    directory = tmp_path_factory.mktemp("pki")
    for ca in ("server_ca", "client_ca", "stranger_ca"):
        _new_ca(directory, ca)
    _new_leaf(directory, "server", "server_ca", 1001, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _new_leaf(directory, "client", "client_ca", 1002, "extendedKeyUsage=clientAuth")
    _new_leaf(directory, "stranger", "stranger_ca", 1003, "extendedKeyUsage=clientAuth")
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=directory)
    (directory / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    (directory / "binary.der").write_bytes(bytes(range(256)))
    return Pki(directory)


def tls_args(pki: Pki, client_ca: bool = False) -> List[str]:
    args = ["--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key")]
    return args + (["--tls-client-ca", pki.path("client_ca.pem")] if client_ca else [])


def secure(pki: Pki, address: str, ca: str = "server_ca", client: Optional[str] = None) -> grpc.Channel:
    """A TLS channel trusting `ca`, presenting the certificate `client` (None: no client certificate);
    its own connection (grpc otherwise shares one between channels to one target)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read(f"{ca}.pem"),
        private_key=pki.read(f"{client}.key") if client else None,
        certificate_chain=pki.read(f"{client}.pem") if client else None,
    )
    return grpc.secure_channel(address, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


def plaintext(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def health(channel: grpc.Channel, timeout_s: float = 10.0) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def scores_shape(channel: grpc.Channel, peers: int = 5) -> Tuple[int, ...]:
    reply = pb_grpc.ScorerStub(channel).Score(score_request(1, FEATURES, peers), timeout=20)
    return tuple(reply.scores.shape)


def refused(channel: grpc.Channel) -> grpc.RpcError:
    """The error of a call the server never lets through (the connection is refused at the handshake)."""
    with pytest.raises(grpc.RpcError) as info:
        health(channel, timeout_s=10)
    return info.value


def reflected_services(channel: grpc.Channel) -> List[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    return [service.name for service in reply.list_services_response.service]


def serve_argv(manifest, *extra: str) -> List[str]:
    return [sys.executable, "-m", "neuronserve", "serve", "--artifact", str(manifest.directory), "--backend", "cpu",
            "--port", "0", "--metrics-port", "off", *extra]


@pytest.fixture
def pools():
    """start(argv) -> a Pool (a serving subprocess in its own process group), killed after the test."""
    started: List[Pool] = []

    def start(argv: List[str]) -> Pool:
        started.append(Pool(argv))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def address(process: Pool) -> str:
    return f"127.0.0.1:{process.ready()['port']}"


# ---- settings and files (unit) ---------------------------------------------------------------------


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_the_new_settings_resolve_with_their_defaults():
    config = resolve_config(parse([]), environ={})
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.reflection) == (None, None, None, True)
    assert (config.drain_delay_s, config.max_connection_age_s) == (0.0, None)
    assert load_tls(config) is None  # plaintext, as before
    config = resolve_config(
        parse(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--reflection", "off", "--drain-delay-s", "2.5", "--max-connection-age-s", "300"]),
        environ={"NEURONSERVE_TLS_CLIENT_CA": "ca.pem", "NEURONSERVE_REFLECTION": "on"},
    )
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.reflection) == ("c.pem", "k.pem", "ca.pem", False)
    assert (config.drain_delay_s, config.max_connection_age_s) == (2.5, 300.0)
    assert resolve_config(parse(["--max-connection-age-s", "off"]), environ={}).max_connection_age_s is None


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--reflection", "maybe"], ["--reflection", "on or off", "'maybe'"]),
        (["--drain-delay-s", "-1"], ["--drain-delay-s", "drain_delay_s", ">= 0"]),
        (["--drain-delay-s", "inf"], ["--drain-delay-s", "finite"]),
        (["--max-connection-age-s", "0"], ["--max-connection-age-s", ">= 0.001"]),
        (["--max-connection-age-s", "1e9"], ["--max-connection-age-s", "gRPC's limit"]),
    ],
)
def test_bad_values_are_config_errors_naming_the_flag(argv, words):
    with pytest.raises(ConfigError) as info:
        resolve_config(parse(argv), environ={})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_connection_options_age_connections_with_the_grace_period_and_state_keepalive():
    options = dict(connection_options(ServerConfig(max_connection_age_s=300, grace_period_s=12.5)))
    assert options["grpc.max_connection_age_ms"] == 300_000 and options["grpc.max_connection_age_grace_ms"] == 12_500
    assert {k: options[k] for k, _ in KEEPALIVE_OPTIONS} == dict(KEEPALIVE_OPTIONS)
    assert "grpc.max_connection_age_ms" not in dict(connection_options(ServerConfig()))  # default: never aged


def test_max_pending_rpcs_bounds_grpcs_queue_of_calls_not_picked_up_and_parses():
    """--max-pending-rpcs N: gRPC's core refuses every new call that finds N waiting for the loop (soft
    limit N, hard N + 1); 64 by default; off (None) leaves gRPC's own bound; the flag and the environment set it; out of range
    is a ConfigError naming it."""
    options = dict(connection_options(ServerConfig(max_pending_rpcs=16)))
    assert (options["grpc.server.max_pending_requests"], options["grpc.server.max_pending_requests_hard_limit"]) == (16, 17)
    assert not any("pending" in name for name, _ in connection_options(ServerConfig(max_pending_rpcs=None)))
    assert dict(connection_options(ServerConfig()))["grpc.server.max_pending_requests"] == 64
    assert resolve_config(parse(["--max-pending-rpcs", "16"]), environ={}).max_pending_rpcs == 16
    assert resolve_config(parse([]), environ={"NEURONSERVE_MAX_PENDING_RPCS": "8"}).max_pending_rpcs == 8
    assert resolve_config(parse([]), environ={}).max_pending_rpcs == 64
    assert resolve_config(parse(["--max-pending-rpcs", "off"]), environ={}).max_pending_rpcs is None
    for bad in (0, 2**31 - 1):
        with pytest.raises(ConfigError, match="max_pending_rpcs"):
            ServerConfig(max_pending_rpcs=bad)


def test_max_pending_rpcs_on_a_grpcio_that_predates_the_bound_says_it_has_no_effect(monkeypatch, caplog):
    monkeypatch.setattr(grpc, "__version__", "1.49.1")  # the Inf1 image's
    connection_options(ServerConfig(max_pending_rpcs=16))
    assert "--max-pending-rpcs has no effect" in caplog.text


def test_good_tls_files_load(pki):
    files = load_tls(ServerConfig(tls_cert=pki.path("server.pem"), tls_key=pki.path("server.key")))
    assert files.cert == pki.read("server.pem") and files.key == pki.read("server.key") and files.client_ca is None
    mutual = load_tls(ServerConfig(tls_cert=pki.path("server.pem"), tls_key=pki.path("server.key"), tls_client_ca=pki.path("client_ca.pem")))
    assert mutual.client_ca == pki.read("client_ca.pem") and mutual.mode.startswith("mTLS")


@pytest.mark.parametrize(
    "cert, key, client_ca, words",
    [
        ("absent.pem", "server.key", None, ["--tls-cert", "absent.pem", "cannot read", "No such file"]),
        ("server.pem", "absent.key", None, ["--tls-key", "absent.key", "cannot read"]),
        ("server.pem", "server.key", "absent.pem", ["--tls-client-ca", "absent.pem", "cannot read"]),
        (".", "server.key", None, ["--tls-cert", "cannot read", "Is a directory"]),
        ("server.key", "server.key", None, ["--tls-cert", "server.key", "not a PEM certificate"]),
        ("garbage.pem", "server.key", None, ["--tls-cert", "garbage.pem", "not a PEM certificate"]),
        ("binary.der", "server.key", None, ["--tls-cert", "binary.der", "not a PEM certificate", "DER"]),
        ("server.pem", "server.pem", None, ["--tls-key", "not a PEM private key"]),
        ("server.pem", "client.key", None, ["--tls-key", "client.key", "does not match", "--tls-cert", "server.pem"]),
        ("server.pem", "encrypted.key", None, ["--tls-key", "encrypted.key", "encrypted"]),
        ("server.pem", "server.key", "server.key", ["--tls-client-ca", "server.key", "not PEM CA certificates"]),
        ("server.pem", None, None, ["--tls-cert needs --tls-key"]),
        (None, "server.key", None, ["--tls-key needs --tls-cert"]),
        (None, None, "client_ca.pem", ["--tls-client-ca needs --tls-cert"]),
    ],
)
def test_bad_tls_files_are_one_line_config_errors_naming_the_flag(pki, cert, key, client_ca, words):
    paths = {name: pki.path(value) if value else None for name, value in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca))}
    with pytest.raises(ConfigError) as info:
        load_tls(ServerConfig(**paths))
    message = str(info.value)
    assert "\n" not in message and "_ssl.c" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_an_unreadable_key_is_a_one_line_error_naming_the_flag(pki, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    key = tmp_path / "locked.key"
    key.write_bytes(pki.read("server.key"))
    key.chmod(0)
    with pytest.raises(ConfigError, match=r"^--tls-key .*locked.key: cannot read it \(Permission denied\)$"):
        load_tls(ServerConfig(tls_cert=pki.path("server.pem"), tls_key=str(key)))


def test_the_cli_refuses_bad_tls_files_in_one_line_with_exit_2_before_serving(pki, small_artifact):
    """One process and a pool alike: the files are checked before anything starts (a pool before it forks)."""
    for workers in ("1", "2"):
        argv = serve_argv(small_artifact, "--workers", workers, "--cores", "2", "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("client.key"))
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [f"neuronserve serve: error: --tls-key {pki.path('client.key')}: does not match the certificate of --tls-cert {pki.path('server.pem')}"]


# ---- TLS and mTLS end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(pki, small_artifact):
    """One process serving TLS (server certificate only), connections aged after ~1 s."""
    process = Pool(serve_argv(small_artifact, "--cores", "1", "--max-connection-age-s", "1", *tls_args(pki)))
    try:
        process.ready()
        yield process
    finally:
        process.stop()


def test_tls_serves_a_client_that_trusts_its_ca_and_refuses_plaintext_and_strangers(pki, tls_server):
    target = address(tls_server)
    with secure(pki, target) as channel:
        assert health(channel) == "SERVING"
        assert scores_shape(channel, peers=7) == (7, LABELS)
        assert "neuronserve.v1.Scorer" in " ".join(reflected_services(channel))  # reflection: on by default
    with plaintext(target) as channel:
        error = refused(channel)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    with secure(pki, target, ca="client_ca") as channel:  # the server's certificate is not from this CA
        error = refused(channel)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "handshake" in error.details().lower(), error
    with secure(pki, f"localhost:{tls_server.ready()['port']}") as channel:  # the name in the certificate works too
        assert health(channel) == "SERVING"
    assert any("gRPC over TLS" in line for line in tls_server.stderr)
    # grpc-core would log a line per failed handshake (anyone can open connections): quiet unless asked for
    assert not any("Handshake failed" in line for line in tls_server.stderr), tls_server.log()


def health_command(target: str, *tls: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "neuronserve", "health", "--address", target, "--timeout-s", "10", *tls]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_neuronserve_health_checks_a_tls_server_with_its_ca_and_says_why_it_cannot_without(pki, tls_server):
    target = address(tls_server)
    served = health_command(target, "--tls-ca", pki.path("server_ca.pem"))
    assert served.returncode == 0 and "SERVING" in served.stderr, served.stderr
    assert health_command(target).returncode == 1  # plaintext against a TLS port
    assert health_command(target, "--tls-ca", pki.path("stranger_ca.pem")).returncode == 1
    renamed = health_command(target, "--tls-ca", pki.path("server_ca.pem"), "--tls-server-name", "elsewhere.example")
    assert renamed.returncode == 1  # the certificate names localhost and 127.0.0.1 only
    missing = health_command(target, "--tls-ca", pki.path("absent.pem"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "--tls-ca" in missing.stderr and "absent.pem" in missing.stderr and "cannot read" in missing.stderr


def test_max_connection_age_makes_a_busy_client_reconnect_without_failing_a_call(pki, tls_server):
    """--max-connection-age-s 1: the server sends GOAWAY after ~1 s (+-10%), the calls in flight finish
    (grace = the grace period) and the channel connects again, so clients rebalance over replicas."""
    ready_at: List[float] = []
    with secure(pki, address(tls_server)) as channel:
        channel.subscribe(lambda state: state == grpc.ChannelConnectivity.READY and ready_at.append(time.monotonic()), try_to_connect=True)
        stub = pb_grpc.ScorerStub(channel)
        request = score_request(2, FEATURES, 3)
        calls, end = 0, time.monotonic() + 30
        while len(ready_at) < 3 and time.monotonic() < end:
            stub.Score(request, timeout=20)  # raises if any call fails
            calls += 1
    assert len(ready_at) >= 3, f"{len(ready_at)} connections in 30 s"
    gaps = [later - earlier for earlier, later in zip(ready_at, ready_at[1:])]
    assert all(0.7 <= gap <= 10 for gap in gaps), gaps  # aged near 1 s, not at once; slack for a loaded machine
    assert calls > 10


def test_mtls_refuses_a_client_without_a_certificate_or_with_an_untrusted_one(pki, pools, small_artifact):
    """mTLS with --reflection off; at the end a second SIGTERM cuts a 60 s drain delay short."""
    process = pools(serve_argv(small_artifact, "--cores", "1", "--reflection", "off", "--drain-delay-s", "60", *tls_args(pki, client_ca=True)))
    target = address(process)
    with secure(pki, target, client="client") as channel:
        assert health(channel) == "SERVING"
        assert scores_shape(channel) == (5, LABELS)
        with pytest.raises(grpc.RpcError) as no_reflection:
            reflected_services(channel)
        assert no_reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED  # --reflection off
    for client in (None, "stranger"):  # no client certificate; one signed by a CA the server does not trust
        with secure(pki, target, client=client) as channel:
            error = refused(channel)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (client, error)
    with plaintext(target) as channel:
        assert refused(channel).code() == grpc.StatusCode.UNAVAILABLE
    client = ("--tls-ca", pki.path("server_ca.pem"), "--tls-cert", pki.path("client.pem"), "--tls-key", pki.path("client.key"))
    assert health_command(target, *client).returncode == 0  # an exec probe of an mTLS server
    assert health_command(target, *client[:2]).returncode == 1  # no client certificate
    assert any("gRPC over mTLS (client certificates required)" in line for line in process.stderr)
    process.proc.send_signal(signal.SIGTERM)  # a 60 s drain delay begins...
    process.wait_for("still serving for the drain delay")
    signalled = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)  # ...and a second signal cuts it short
    assert process.wait() == 0, process.log()
    assert time.monotonic() - signalled < 15 and process.lines("drain delay cut short")


@pytest.fixture(scope="module")
def tls_pool(pki, small_artifact):
    process = Pool(serve_argv(small_artifact, "--workers", "2", "--cores", "2", *tls_args(pki)))
    try:
        process.ready()
        process.workers()
        yield process
    finally:
        process.stop()


def test_a_pool_serves_tls_on_the_shared_port_and_on_every_private_port(pki, tls_pool):
    workers = tls_pool.workers()
    for target in [address(tls_pool)] + [worker.address for worker in workers.values()]:
        with secure(pki, target) as channel:
            assert health(channel) == "SERVING" and scores_shape(channel) == (5, LABELS), target
        with plaintext(target) as channel:
            assert refused(channel).code() == grpc.StatusCode.UNAVAILABLE, target


def test_model_statistics_of_a_tls_pool_sum_both_workers(pki, tls_pool):
    workers = tls_pool.workers()
    own = []
    for index in (0, 1):
        with secure(pki, workers[index].address) as channel:
            scores_shape(channel)
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            (stats,) = stub.ModelStatistics(oip.ModelStatisticsRequest(name="twotower"), metadata=(WORKER_SCOPE,), timeout=10).model_stats
            own.append(stats.inference_count)
    with secure(pki, address(tls_pool)) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def pooled() -> int:
            return stub.ModelStatistics(oip.ModelStatisticsRequest(name="twotower"), timeout=10).model_stats[0].inference_count

        # asked again if a worker missed the 1 s the pooled answer gives it (logged); a wrong sum never matches
        poll(lambda: pooled() == sum(own), 10, lambda: f"pooled {pooled()} != {sum(own)}; " + tls_pool.log())


# ---- SIGTERM with a drain delay, under load ----------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    at: float  # time.monotonic() when the call ended
    code: str
    details: str


class Traffic:
    """`clients` threads calling Score back to back (each on its own connection) and one thread asking
    Health.Check every 10 ms on a connection of its own; every outcome is recorded with its time."""

    def __init__(self, target: str, clients: int) -> None:
        self.target = target
        self.clients = clients
        self.calls: List[Outcome] = []
        self.health: List[Tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        self._threads.append(threading.Thread(target=self._prober, daemon=True))

    def _client(self, index: int) -> None:
        with plaintext(self.target) as channel:
            stub = pb_grpc.ScorerStub(channel)
            request = score_request(index, FEATURES, 1 + index * 5)
            while not self._stop.is_set():
                try:
                    stub.Score(request, timeout=20)
                    code, details = "OK", ""
                except grpc.RpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                with self._lock:
                    self.calls.append(Outcome(time.monotonic(), code, details))
                if code != "OK":
                    self._stop.wait(0.01)  # no busy loop against a closed port

    def _prober(self) -> None:
        with plaintext(self.target) as channel:
            while not self._stop.is_set():
                try:
                    status = health(channel, timeout_s=5)
                except grpc.RpcError as exc:
                    status = exc.code().name
                with self._lock:
                    self.health.append((time.monotonic(), status))
                self._stop.wait(0.01)

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def ok(self, after: float = 0.0, before: float = float("inf")) -> int:
        with self._lock:
            return sum(1 for o in self.calls if o.code == "OK" and after <= o.at < before)

    def first_health(self, status: str, after: float) -> Optional[float]:
        with self._lock:
            return next((at for at, seen in self.health if seen == status and at >= after), None)


def answered(stderr: List[str], processes: int) -> Dict[str, int]:
    """The serving processes' own counts of the requests they answered (their last log lines), summed."""
    lines = [line for line in stderr if "stopped cleanly; requests answered:" in line]
    assert len(lines) == processes, stderr[-20:]
    totals: Dict[str, int] = {}
    for line in lines:
        for status, count in re.findall(r"(\w+)=(\d+)", line.split("requests answered:", 1)[1]):  # or "none"
            totals[status] = totals.get(status, 0) + int(count)
    return totals


DRAIN_DELAY_S = 2.0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_with_a_drain_delay_keeps_serving_after_health_goes_not_serving(pools, small_artifact, workers):
    """SIGTERM under load with --drain-delay-s 2: health answers NOT_SERVING at once, Score calls are still
    answered OK for the 2 s (none refused before they are over), then the drain as without a delay: every
    call a serving process accepted is answered (its own tally equals what the clients received), exit 0."""
    process = pools(serve_argv(small_artifact, "--workers", str(workers), "--cores", str(workers),
                               "--drain-delay-s", str(DRAIN_DELAY_S), "--grace-period-s", "20"))
    target = address(process)
    if workers > 1:
        process.workers(workers)
    with Traffic(target, clients=4) as traffic:
        poll(lambda: traffic.ok() >= 60 and traffic.first_health("SERVING", 0.0), 60, lambda: f"{traffic.ok()} OK calls; {traffic.health[-3:]}")
        signalled = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        not_serving = poll(lambda: traffic.first_health("NOT_SERVING", signalled), 10, lambda: f"health after SIGTERM: {traffic.health[-5:]}")
        exit_code = process.wait()
        exited = time.monotonic()
    assert exit_code == 0, process.log()
    assert not_serving - signalled < 1.0, f"health NOT_SERVING {not_serving - signalled:.2f} s after SIGTERM"
    served_during_delay = traffic.ok(after=not_serving, before=signalled + DRAIN_DELAY_S)
    assert served_during_delay >= 20, f"{served_during_delay} OK answers between NOT_SERVING and the end of the delay"
    assert traffic.ok(after=signalled + DRAIN_DELAY_S / 2, before=signalled + DRAIN_DELAY_S) > 0  # still serving well into the delay
    refusals = [o.at for o in traffic.calls if o.code != "OK"]
    assert not refusals or min(refusals) >= signalled + DRAIN_DELAY_S, f"a call failed {min(refusals) - signalled:.2f} s after SIGTERM"
    assert exited - signalled >= DRAIN_DELAY_S
    received: Dict[str, int] = {}
    for outcome in traffic.calls:
        received[outcome.code] = received.get(outcome.code, 0) + 1
    refused_at_door = sum(1 for o in traffic.calls if o.code == "UNAVAILABLE" and "shutting down" in o.details)
    tally = answered(process.stderr, workers)
    assert set(received) <= {"OK", "UNAVAILABLE", "CANCELLED"}, received
    assert set(tally) <= {"OK", "UNAVAILABLE"}, tally  # nothing a process accepted was cancelled or failed
    assert tally["OK"] == received["OK"]  # every accepted request's answer reached its client
    assert tally.get("UNAVAILABLE", 0) == refused_at_door
    assert received.get("CANCELLED", 0) <= traffic.clients  # at most one call per client in the instant gRPC stops
    assert any("drain delay" in line for line in process.stderr)
    assert not any("Traceback" in line for line in process.stderr), process.log()
