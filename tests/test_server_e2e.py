"""`neuronserve serve` end to end: settings resolution (flags > config file > environment > defaults),
then the real command in a subprocess on port 0: its ready line, real stub calls, metrics, the
one-line errors of the CLI, the README's main job (no --artifact: the demo model), and SIGTERM under
load: every accepted request is answered (OK, or UNAVAILABLE when refused at the door) and the
process exits 0."""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import List, Optional

import grpc
import numpy as np
import pytest

from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError
from neuronserve.serve import run
from neuronserve.server import Server
from neuronserve.settings import add_arguments, resolve_config

pytestmark = pytest.mark.timeout(90)

READY = re.compile(
    r"^neuronserve ready: grpc=(?P<host>[^:\s]+):(?P<port>\d+) metrics=(?P<metrics>\S+) backend=(?P<backend>\w+) "
    r"cores=(?P<cores>\d+) buckets=(?P<buckets>[\d,]+) model=(?P<model>\S+) version=(?P<version>\S+) workers=(?P<workers>\d+)$"
)


# ---- settings -----------------------------------------------------------------------------------


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_come_from_the_dataclasses():
    assert resolve_config(parse([]), environ={}) == ServerConfig()


def test_flags_beat_the_config_file_which_beats_the_environment(tmp_path):
    config_file = tmp_path / "serve.json"
    config_file.write_text(json.dumps({"port": 9100, "cores": 2, "max_queue_delay_ms": 0.5, "metrics_port": None, "sim_latency_scale": 0}))
    environ = {"NEURONSERVE_PORT": "9000", "NEURONSERVE_BACKEND": "sim", "NEURONSERVE_CORES": "3", "NEURONSERVE_MAX_QUEUE_ROWS": "99", "NEURONSERVE_VENV": ".venv"}
    config = resolve_config(parse(["--config", str(config_file), "--port", "9200", "--max-batch-rows", "64"]), environ=environ)
    assert config.port == 9200  # flag over file over environment
    assert config.cores == 2  # file over environment
    assert config.backend == "sim"  # environment only
    assert config.metrics_port is None  # file: null = no metrics server
    assert (config.batching.max_queue_rows, config.batching.max_queue_delay_ms, config.batching.max_batch_rows) == (99, 0.5, 64)
    assert config.sim.latency_scale == 0.0
    assert config.host == ServerConfig().host  # default
    environ_config = resolve_config(parse([]), environ={"NEURONSERVE_CONFIG": str(config_file), "NEURONSERVE_METRICS_PORT": "off"})
    assert environ_config.port == 9100 and environ_config.metrics_port is None


@pytest.mark.parametrize(
    "argv, environ, file_data, words",
    [
        (["--port", "http"], {}, None, ["--port", "integer", "'http'"]),
        (["--port", "70000"], {}, None, ["--port", "0-65535", "70000"]),
        ([], {"NEURONSERVE_MAX_QUEUE_DELAY_MS": "-1"}, None, ["NEURONSERVE_MAX_QUEUE_DELAY_MS", "max_queue_delay_ms", ">= 0"]),
        ([], {"NEURONSERVE_BACKEND": "gpu"}, None, ["NEURONSERVE_BACKEND", "auto, cpu, sim, neuron", "'gpu'"]),
        ([], {}, {"cores": "four"}, ["config file", "'cores'", "integer"]),
        ([], {}, {"max_queue_rows": 0}, ["config file", "'max_queue_rows'", ">= 1"]),
        ([], {}, {"prot": 1}, ["config file", "unknown keys", "prot", "port"]),
        ([], {}, [1, 2], ["config file", "JSON object"]),
        (["--grace-period-s", "-2"], {}, None, ["--grace-period-s", ">= 0"]),
        (["--sim-latency-scale", "x"], {}, None, ["--sim-latency-scale", "number"]),
        (["--grace-period-s", "nan"], {}, None, ["--grace-period-s", "finite", "'nan'"]),
        (["--sim-latency-scale", "inf"], {}, None, ["--sim-latency-scale", "finite"]),
        ([], {}, {"max_queue_delay_ms": "Infinity"}, ["'max_queue_delay_ms'", "finite"]),
        (["--max-message-bytes", str(2**31)], {}, None, ["--max-message-bytes", f"<= {2**31 - 1}"]),
        (["--max-scoring-bytes", "0"], {}, None, ["--max-scoring-bytes", ">= 1"]),
        (["--gil-switch-ms", "0"], {}, None, ["--gil-switch-ms", "> 0"]),
    ],
)
def test_a_bad_setting_is_a_config_error_naming_its_source(tmp_path, argv, environ, file_data, words):
    if file_data is not None:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(file_data))
        argv = argv + ["--config", str(path)]
    with pytest.raises(ConfigError) as info:
        resolve_config(parse(argv), environ=environ)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_serving_process_sets_the_gil_switch_interval(monkeypatch):
    from neuronserve.serve import tune_process

    monkeypatch.setattr(sys, "setswitchinterval", lambda s: seen.append(s))
    seen: list = []
    tune_process(resolve_config(parse(["--gil-switch-ms", "0.25"]), environ={}))
    tune_process(resolve_config(parse([]), environ={}))
    assert seen == [0.25e-3, ServerConfig().gil_switch_ms / 1e3]


def test_a_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_config(parse(["--config", str(tmp_path / "absent.json")]), environ={})
    (tmp_path / "broken.json").write_text("{port: 1")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(parse(["--config", str(tmp_path / "broken.json")]), environ={})


def test_run_and_server_need_an_artifact():
    with pytest.raises(ConfigError, match="--artifact"):
        run(ServerConfig())
    with pytest.raises(ConfigError, match="--artifact"):
        Server(ServerConfig())


# ---- the command in a subprocess ----------------------------------------------------------------


class Serve:
    """`python -m neuronserve serve ARGS` with stdout/stderr collected by threads."""

    def __init__(self, args: List[str], env: Optional[dict] = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neuronserve", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.stderr: List[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True),
        ]
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line.rstrip("\n"))

    def ready(self, timeout_s: float = 60.0) -> re.Match:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = READY.match(line)
            if match:
                return match
        self.kill()
        raise AssertionError(f"no ready line; exit {self.proc.poll()}; stderr:\n" + "\n".join(self.stderr[-30:]))

    def wait(self, timeout_s: float = 30.0) -> int:
        code = self.proc.wait(timeout_s)
        for pump in self._pumps:  # EOF on both pipes: every line the process wrote has been taken
            pump.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve():
    started: List[Serve] = []

    def start(args: List[str], env: Optional[dict] = None) -> Serve:
        started.append(Serve(args, env))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def tensor(array):
    from neuronserve.protos import scorer_pb2 as pb

    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=array.tobytes(), shape=array.shape)


def score_request(seed: int, features: int, peers: int):
    from neuronserve.protos import scorer_pb2 as pb

    rng = np.random.default_rng(seed)
    return pb.ScoreRequest(
        user_features=tensor(rng.standard_normal((1, features))), peer_features=tensor(rng.standard_normal((peers, features)))
    )


def artifact_args(manifest, *extra: str) -> List[str]:
    return ["--artifact", str(manifest.directory), "--port", "0", "--metrics-port", "0", *extra]


def test_sigterm_during_warm_up_stops_promptly_without_ever_serving(serve, small_artifact):
    """On Inf1 the warm-up takes minutes; a SIGTERM then must not wait for it (nor print ready)."""
    # one simulated core, each execution ~2 s: the full warm-up (3 stages x 3 buckets) takes ~18 s
    process = serve(artifact_args(small_artifact, "--backend", "sim", "--cores", "1", "--sim-latency-scale", "4000"))
    end = time.monotonic() + 60
    while not any("loading and warming up" in line for line in process.stderr):
        assert time.monotonic() < end and process.proc.poll() is None, process.stderr
        time.sleep(0.05)
    port = re.search(r"gRPC port (\d+) NOT_SERVING", next(line for line in process.stderr if "warming up" in line)).group(1)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # meanwhile: fast answers, not a hang
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from neuronserve.protos import scorer_pb2_grpc as pb_grpc

        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ScorerStub(channel).Score(score_request(1, 16, 3), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in refused.value.details()
    started = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    assert process.wait(timeout_s=30) == 0
    assert time.monotonic() - started < 12  # gave up at the next stage, not after the whole warm-up
    assert process.lines.empty()  # no ready line
    assert any("abandoning" in line for line in process.stderr) and not any("Traceback" in line for line in process.stderr)


def test_serve_prints_its_ready_line_answers_and_exits_0_on_sigterm(serve, small_artifact):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    process = serve(artifact_args(small_artifact, "--backend", "sim", "--cores", "2", "--sim-latency-scale", "0"))
    ready = process.ready()
    assert ready["backend"] == "sim" and ready["cores"] == "2" and ready["buckets"] == "1,4,16"
    assert (ready["model"], ready["version"]) == (small_artifact.model_name, small_artifact.model_version)
    with grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = pb_grpc.ScorerStub(channel).Score(score_request(1, 16, 20), timeout=10)
        assert list(reply.scores.shape) == [20, 3]
    import urllib.request

    metrics_port = ready["metrics"].rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        assert 'nv_inference_request_success{model="twotower"' in response.read().decode()
    process.proc.send_signal(signal.SIGTERM)
    assert process.wait() == 0
    assert any("stopped cleanly" in line for line in process.stderr)


def server_answers(stderr: List[str]) -> Counter:
    """The server's own count of the requests it answered, from its last log line."""
    line = next(line for line in stderr if "stopped cleanly; requests answered:" in line)
    return Counter({k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line.split("requests answered:", 1)[1])})


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(serve, small_artifact):
    """Client threads fire Score continuously; SIGTERM lands mid-stream. Every request the service
    accepted is answered: the server's own tally (logged at exit) equals what the clients received, OK
    or UNAVAILABLE (refused at the door), and holds no CANCELLED or other failure. A client may also
    see UNAVAILABLE once the port is closed, or CANCELLED for a call that reached the gRPC transport in
    the instant its shutdown began and never reached the service (grpc.aio drops calls it has not yet
    picked up); neither is in the server's tally, which is the point: none was accepted and lost."""
    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    process = serve(artifact_args(small_artifact, "--backend", "sim", "--cores", "2", "--grace-period-s", "20"))
    target = f"127.0.0.1:{process.ready()['port']}"
    outcomes: List[tuple] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ScorerStub(channel)
            request = score_request(seed, 16, 1 + seed * 7)
            while not stop.is_set():
                try:
                    stub.Score(request, timeout=20)
                    outcome = ("OK", "")
                except grpc.RpcError as exc:
                    outcome = (exc.code().name, exc.details())
                with lock:
                    outcomes.append(outcome)
                if outcome[0] != "OK":
                    time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(6)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + 30
    while sum(1 for code, _ in outcomes if code == "OK") < 60 and time.monotonic() < end:
        time.sleep(0.01)
    process.proc.send_signal(signal.SIGTERM)
    exit_code = process.wait()
    time.sleep(0.3)  # the clients see the closed port
    stop.set()
    for thread in threads:
        thread.join(30)
    assert exit_code == 0, "\n".join(process.stderr[-20:])

    received = Counter(code for code, _ in outcomes)
    refused_at_door = sum(1 for code, details in outcomes if code == "UNAVAILABLE" and "shutting down" in details)
    answered = server_answers(process.stderr)
    assert received["OK"] >= 60
    assert set(received) <= {"OK", "UNAVAILABLE", "CANCELLED"}, Counter(outcomes).most_common(5)
    assert set(answered) <= {"OK", "UNAVAILABLE"}, answered  # nothing the service accepted was cancelled or failed
    assert answered["OK"] == received["OK"]  # every accepted request's answer reached its client
    assert answered["UNAVAILABLE"] == refused_at_door
    assert received["CANCELLED"] <= 6  # at most one in-flight call per client thread at the instant of shutdown


def test_an_open_health_watch_does_not_hold_the_shutdown(serve, small_artifact):
    """gRPC client-side health checking keeps a Health.Watch stream open; once every accepted request
    is answered the server ends it, instead of waiting out the grace period."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    process = serve(artifact_args(small_artifact, "--backend", "cpu", "--cores", "1", "--grace-period-s", "30"))
    target = f"127.0.0.1:{process.ready()['port']}"
    seen: List[int] = []
    with grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)

        def follow() -> None:
            try:
                for reply in watch:
                    seen.append(reply.status)
            except grpc.RpcError:
                pass

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        end = time.monotonic() + 10
        while not seen and time.monotonic() < end:
            time.sleep(0.01)
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        assert process.wait(timeout_s=30) == 0
        assert time.monotonic() - started < 10  # not the 30 s grace period
        follower.join(10)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert seen[0] == serving and not_serving in seen  # the watcher was told before the stream ended


def test_cli_errors_are_one_line_and_exit_2(serve, tmp_path):
    process = serve(["--port", "http"])
    assert process.wait() == 2
    assert process.stderr == ["neuronserve serve: error: --port: expected an integer, got 'http'"]
    process = serve(["--artifact", str(tmp_path / "nowhere"), "--port", "0", "--metrics-port", "off"])
    assert process.wait() == 2
    assert len(process.stderr) == 1 and "does not exist" in process.stderr[0] and "Traceback" not in process.stderr[0]


def test_a_taken_port_is_a_one_line_error(serve, small_artifact):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = serve(["--artifact", str(small_artifact.directory), "--backend", "cpu", "--cores", "1", "--port", str(port), "--metrics-port", "off"])
        assert process.wait() == 2
    errors = [line for line in process.stderr if "error:" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "--port" in errors[0], process.stderr
    assert not any("Traceback" in line for line in process.stderr)


def test_the_readme_main_job_serves_the_demo_model_with_no_artifact(serve, tmp_path):
    """`neuronserve serve` with no --artifact compiles the demo model into the cache on first run."""
    from neuronserve.protos import open_inference_pb2 as oip
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc

    process = serve(["--port", "0", "--metrics-port", "off"], env={"NEURONSERVE_CACHE_DIR": str(tmp_path)})
    ready = process.ready(timeout_s=80)
    assert ready["metrics"] == "-" and ready["backend"] == "cpu" and ready["buckets"] == "1,8,32,128,512,1024"
    assert ready["cores"] == str(max(1, len(os.sched_getaffinity(0)) - 1))  # cpu default: a CPU per executor, one left for the event loop
    with grpc.insecure_channel(f"127.0.0.1:{ready['port']}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(oip.ModelMetadataRequest(name="twotower"), timeout=10)
        assert [list(t.shape) for t in meta.inputs] == [[1, 64], [-1, 64]]
        from neuronserve.protos import scorer_pb2_grpc as pb_grpc

        reply = pb_grpc.ScorerStub(channel).Score(score_request(3, 64, 100), timeout=10)
        assert list(reply.scores.shape) == [100, 4] and list(reply.label_names) == ["like", "chat", "match", "report"]
    assert any(Path(tmp_path).iterdir())
    process.proc.send_signal(signal.SIGINT)
    assert process.wait() == 0


def test_unknown_neuronserve_variables_are_named_and_an_empty_artifact_means_the_demo(caplog):
    environ = {"NEURONSERVE_PROT": "9000", "NEURONSERVE_VENV": ".venv", "NEURONSERVE_CACHE_DIR": "/tmp", "NEURONSERVE_ARTIFACT": ""}
    with caplog.at_level("WARNING"):
        config = resolve_config(parse([]), environ=environ)
    assert "NEURONSERVE_PROT" in caplog.text and "not a neuronserve setting" in caplog.text
    assert "NEURONSERVE_VENV" not in caplog.text and "NEURONSERVE_CACHE_DIR" not in caplog.text
    assert config.artifact is None and config.port == ServerConfig().port


def test_a_reply_to_a_call_that_had_ended_is_logged_as_one_info_line_not_an_error_traceback(caplog):
    """grpc.aio logs ExecuteBatchError with a traceback when a handler's reply meets a call the client
    has just cancelled; serve's logging turns it into one INFO line naming the method."""
    import logging

    from neuronserve.serve import GRPC_AIO_LOGGER, ReplyAfterCallEnded, quiet_replies_after_call_ended

    quiet_replies_after_call_ended()
    quiet_replies_after_call_ended()
    grpc_log = logging.getLogger(GRPC_AIO_LOGGER)
    assert sum(isinstance(f, ReplyAfterCallEnded) for f in grpc_log.filters) == 1
    with caplog.at_level(logging.INFO, logger=GRPC_AIO_LOGGER):
        try:
            raise RuntimeError('Failed "execute_batch": (SendStatusFromServerOperation,)')
        except RuntimeError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/twotower.Scorer/Score")
        grpc_log.error("Unexpected [ValueError] raised by servicer method [/twotower.Scorer/Score]")
    ended, other = caplog.records
    assert (ended.levelno, ended.exc_info, ended.exc_text) == (logging.INFO, None, None)
    assert ended.getMessage().endswith("the call has already ended (the client gone or its deadline past) [/twotower.Scorer/Score]")
    assert "Traceback" not in caplog.text
    assert other.levelno == logging.ERROR  # anything else grpc logs is left as it is
