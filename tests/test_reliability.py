"""Reliability against hostile or unlucky clients and devices, on real servers on 127.0.0.1 (in process,
on an event loop thread, so the server's log is pytest's caplog): malformed request bodies on every RPC
of every service, client strings too long to echo, every simulated core failing; and the device
watcher on a fake clock."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from neuronserve.config import SimConfig
from neuronserve.health import DeviceWatcher
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.service import ECHO_CHARS, MAX_DETAILS_CHARS, UNKNOWN_MODEL
from support import wait_until
from test_service import LoopThread, Stubs, array, infer_request, rng_features, rpc_error, score_request, start_server

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
F = 16  # the small artifact's feature widths


@pytest.fixture(scope="module")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def cpu_server(loop_thread, small_artifact):
    # the floods keep 256 calls in flight: gRPC's own pending bound, so each is read and answered (the
    # default 64 refuses some of a burst before the loop sees it; test_service covers that)
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=2, max_pending_rpcs=None)
    yield server
    loop_thread.run(server.stop(5.0))


@pytest.fixture(scope="module")
def cpu(cpu_server):
    stubs = Stubs(cpu_server.port)
    yield stubs
    stubs.channel.close()


def failures(port: int, model: str, reason: str) -> int:
    """nv_inference_request_failure{model, reason} from /metrics (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_request_failure{") and f'model="{model}"' in line and f'reason="{reason}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def no_tracebacks(caplog) -> None:
    assert "Traceback" not in caplog.text, caplog.text[-3000:]
    assert "Unexpected" not in caplog.text, caplog.text[-3000:]


# ---- malformed bodies on every RPC ---------------------------------------------------------------


def every_rpc():
    """(path, request class, client streaming, server streaming) of every RPC the server registers."""
    from neuronserve.protos import open_inference_pb2, scorer_pb2

    services = [
        (scorer_pb2, scorer_pb2.DESCRIPTOR.services_by_name["Scorer"]),
        (open_inference_pb2, open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
        (health_pb2, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        (reflection_pb2, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
    ]
    return [
        (f"/{service.full_name}/{method.name}", getattr(module, method.input_type.name), method.client_streaming, method.server_streaming)
        for module, service in services
        for method in service.methods
    ]


def malformed_bodies(cls, rng: np.random.Generator, count: int):
    """`count` byte strings that do not parse as `cls`: random bytes, truncated fields, varints that never
    end, invalid wire types and field 0, stray end-group tags, invalid UTF-8 in a string field, truncated
    valid messages. Each is checked to fail cls.FromString, so every one must be refused."""
    valid = {
        pb.ScoreRequest: score_request(rng_features(1, 1, F), rng_features(2, 4, F)).SerializeToString(),
        oip.ModelInferRequest: infer_request(rng_features(1, 1, F), rng_features(2, 4, F)).SerializeToString(),
        health_pb2.HealthCheckRequest: health_pb2.HealthCheckRequest(service="neuronserve.v1.Scorer").SerializeToString(),
    }.get(cls, b"")
    bodies = []
    while len(bodies) < count:
        kind = int(rng.integers(7))
        field = int(rng.integers(1, 16))
        if kind == 0:
            body = rng.bytes(int(rng.integers(1, 64)))
        elif kind == 1:  # a length-delimited field longer than the body
            body = bytes([(field << 3) | 2, int(rng.integers(8, 127))]) + rng.bytes(int(rng.integers(0, 6)))
        elif kind == 2:  # a varint that never ends
            body = bytes([field << 3]) + b"\xff" * int(rng.integers(1, 12))
        elif kind == 3:  # field 0, or wire types 6 and 7
            body = bytes([int(rng.choice([0x00, 0x07, (field << 3) | 6, (field << 3) | 7]))]) + rng.bytes(int(rng.integers(0, 8)))
        elif kind == 4:  # an end-group tag with no group
            body = bytes([(field << 3) | 4])
        elif kind == 5:  # invalid UTF-8 in field 1 (a string in most of these messages)
            body = b"\x0a\x02\xc3\x28"
        else:  # a valid message cut short
            body = valid[: int(rng.integers(1, len(valid)))] if len(valid) > 1 else rng.bytes(3)
        try:
            cls.FromString(body)
        except DecodeError:
            bodies.append(body)
    return bodies


def finish(call, streaming: bool) -> grpc.StatusCode:
    """The call's status. A stream's replies are read first: a client gets the status only after them."""
    if streaming:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass
    return call.code()


def test_10000_malformed_bodies_on_every_rpc_are_invalid_argument_counted_and_never_a_traceback(cpu, cpu_server, caplog):
    rounds, per_rpc_round = 5, 140
    rpcs = every_rpc()
    assert len(rpcs) == 21  # 6 scorer + 8 OIP + 3 repository (Triton) + health Check, List and Watch + reflection
    rng = np.random.default_rng(12)
    bodies = {path: malformed_bodies(cls, rng, rounds * per_rpc_round) for path, cls, _, _ in rpcs}
    good = score_request(rng_features(3, 1, F), rng_features(4, 9, F))
    expected = array(cpu.scorer.Score(good, timeout=10).scores)
    counted_before = failures(cpu_server.metrics_port, UNKNOWN_MODEL, "INVALID_ARGUMENT")
    codes: collections.Counter = collections.Counter()
    bad_details = []
    sent = 0
    start = time.monotonic()
    for r in range(rounds):
        calls = []
        for path, _, client_streaming, server_streaming in rpcs:
            for i, body in enumerate(bodies[path][r * per_rpc_round : (r + 1) * per_rpc_round]):
                if client_streaming:  # reflection: a stream whose first (or second, after a valid one) message is malformed
                    first = [reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()] if i % 2 else []
                    calls.append((cpu.channel.stream_stream(path)(iter(first + [body]), timeout=30), True))
                elif server_streaming:
                    calls.append((cpu.channel.unary_stream(path)(body, timeout=30), True))
                else:
                    calls.append((cpu.channel.unary_unary(path).future(body, timeout=30), False))
                sent += 1
                if len(calls) % 256 == 0:  # keep at most a few hundred in flight
                    finish(*calls[-256])
        for call, streaming in calls:
            codes[finish(call, streaming)] += 1
            details = call.details() or ""
            if "\n" in details or "not a valid" not in details or len(details) > MAX_DETAILS_CHARS:
                bad_details.append(details)
        # between rounds: a valid request is still exact, health still SERVING
        np.testing.assert_array_equal(array(cpu.scorer.Score(good, timeout=10).scores), expected)
        assert cpu.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    elapsed = time.monotonic() - start
    assert sent >= 10_000
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT: sent}, (codes, elapsed)
    assert not bad_details, bad_details[:5]
    no_tracebacks(caplog)
    assert failures(cpu_server.metrics_port, UNKNOWN_MODEL, "INVALID_ARGUMENT") - counted_before == sent


def test_a_malformed_message_on_a_reflection_stream_ends_it_after_the_valid_ones_are_answered(cpu, caplog):
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    valid = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    call = cpu.channel.stream_stream(path, response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(
        iter([valid, valid, b"\xff\xff"]), timeout=10
    )
    replies = []
    with pytest.raises(grpc.RpcError):
        for reply in call:
            replies.append(reply)
    assert len(replies) == 2 and replies[0].list_services_response.service
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
    no_tracebacks(caplog)


def test_health_list_answers_every_status(cpu):
    reply = cpu.health.List(health_pb2.HealthListRequest(), timeout=10)
    assert {name: r.status for name, r in reply.statuses.items()} == dict.fromkeys(
        ("", "neuronserve.v1.Scorer", "inference.GRPCInferenceService", "grpc.health.v1.Health"), SERVING
    )


# ---- client strings are echoed bounded --------------------------------------------------------


LONG = "m" * 20_000


def _infer(mutate) -> oip.ModelInferRequest:
    request = infer_request(rng_features(1, 1, F), rng_features(2, 4, F))
    mutate(request)
    return request


ECHO_CASES = [
    # (id, stub, rpc, request, status)
    ("metadata-name", "oip", "ModelMetadata", oip.ModelMetadataRequest(name=LONG), grpc.StatusCode.NOT_FOUND),
    ("metadata-version", "oip", "ModelMetadata", oip.ModelMetadataRequest(name="twotower", version=LONG), grpc.StatusCode.NOT_FOUND),
    ("config-name", "oip", "ModelConfig", oip.ModelConfigRequest(name=LONG), grpc.StatusCode.NOT_FOUND),
    ("statistics-name", "oip", "ModelStatistics", oip.ModelStatisticsRequest(name=LONG), grpc.StatusCode.NOT_FOUND),
    ("infer-model", "oip", "ModelInfer", _infer(lambda r: setattr(r, "model_name", LONG)), grpc.StatusCode.NOT_FOUND),
    ("infer-input-name", "oip", "ModelInfer", _infer(lambda r: setattr(r.inputs[1], "name", LONG)), grpc.StatusCode.INVALID_ARGUMENT),
    ("infer-datatype", "oip", "ModelInfer", _infer(lambda r: setattr(r.inputs[1], "datatype", LONG)), grpc.StatusCode.INVALID_ARGUMENT),
    ("infer-output", "oip", "ModelInfer", _infer(lambda r: r.outputs.add(name=LONG)), grpc.StatusCode.INVALID_ARGUMENT),
    ("infer-outputs", "oip", "ModelInfer", _infer(lambda r: [r.outputs.add(name="SCORES") for _ in range(5000)]), grpc.StatusCode.INVALID_ARGUMENT),
    ("infer-raw-dims", "oip", "ModelInfer", _infer(lambda r: r.inputs[1].shape.extend([1] * 5000)), grpc.StatusCode.INVALID_ARGUMENT),
    ("infer-typed-dims", "oip", "ModelInfer", oip.ModelInferRequest(model_name="twotower", inputs=[oip.ModelInferRequest.InferInputTensor(name="USER_FEATURES", datatype="FP32", shape=[1] * 70, contents=oip.InferTensorContents(fp32_contents=[1.0]))]), grpc.StatusCode.INVALID_ARGUMENT),
    ("score-dims", "scorer", "Score", pb.ScoreRequest(user_features=pb.Tensor(shape=[1] * 70, data=b"\0" * 4)), grpc.StatusCode.INVALID_ARGUMENT),
    ("score-negative-dims", "scorer", "Score", pb.ScoreRequest(user_features=pb.Tensor(shape=[-1] * 5000)), grpc.StatusCode.INVALID_ARGUMENT),
    ("newline", "oip", "ModelMetadata", oip.ModelMetadataRequest(name="a\nb\r\nTraceback (most recent call last):"), grpc.StatusCode.NOT_FOUND),
]


@pytest.mark.parametrize("stub, rpc, request_, status", [case[1:] for case in ECHO_CASES], ids=[case[0] for case in ECHO_CASES])
def test_client_strings_are_echoed_bounded_on_one_line(cpu, caplog, stub, rpc, request_, status):
    error = rpc_error(getattr(getattr(cpu, stub), rpc), request_, timeout=10)
    assert error.code() == status, (error.code(), error.details()[:300])
    details = error.details()
    assert len(details) <= 2 * ECHO_CHARS + 200, details  # one echoed string, cut, plus the sentence
    assert "\n" not in details and "\r" not in details
    no_tracebacks(caplog)


def test_a_20000_character_model_name_is_not_found_with_a_bounded_message(cpu):
    error = rpc_error(cpu.oip.ModelMetadata, oip.ModelMetadataRequest(name=LONG), timeout=10)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert f"'{'m' * ECHO_CHARS}'... (20000 characters)" in error.details()
    assert "twotower" in error.details()  # the models it does serve
    assert not cpu.oip.ModelReady(oip.ModelReadyRequest(name=LONG), timeout=10).ready


# ---- health follows the device -----------------------------------------------------------------


RESET_S = 3.0  # long enough to see NOT_SERVING on a loaded host, short enough to wait for


@pytest.fixture(scope="module")
def sim_server(loop_thread, small_artifact):
    server = start_server(loop_thread, small_artifact, backend="sim", cores=2, sim=SimConfig(latency_scale=0.0, reset_s=RESET_S))
    yield server
    loop_thread.run(server.stop(5.0))


def poll(predicate, timeout_s: float) -> float:
    """Seconds until predicate() held; AssertionError past timeout_s."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not reached within {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - start


def test_all_cores_failing_is_not_serving_and_not_ready_within_a_second_and_serving_after_the_reset(sim_server, caplog):
    stubs = Stubs(sim_server.port)
    try:
        names = ("", "neuronserve.v1.Scorer", "inference.GRPCInferenceService")

        def statuses():
            return {name: stubs.health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status for name in names}

        def ready():
            return stubs.oip.ServerReady(oip.ServerReadyRequest(), timeout=5).ready, stubs.oip.ModelReady(oip.ModelReadyRequest(name="twotower"), timeout=5).ready

        good = score_request(rng_features(5, 1, F), rng_features(6, 7, F))
        expected = array(stubs.scorer.Score(good, timeout=10).scores)
        assert statuses() == dict.fromkeys(names, SERVING) and ready() == (True, True)
        watched = []  # Health.Watch on "": through the guard, still a server stream
        watch = stubs.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        def read_watch():
            try:
                for reply in watch:
                    watched.append(reply.status)
            except grpc.RpcError:  # cancelled at the end
                pass

        reader = threading.Thread(target=read_watch, daemon=True)
        reader.start()
        poll(lambda: watched == [SERVING], 5)

        cores = sim_server.cores
        for core in range(cores):
            sim_server.backend.inject_fault(core, "fail")
        sent = 0
        while any(c.healthy for c in sim_server.backend.stats().cores):  # each request meets one faulty core
            assert sent < 2 * cores
            last_fault_s = time.monotonic()
            assert rpc_error(stubs.scorer.Score, good, timeout=10).code() == grpc.StatusCode.UNAVAILABLE
            sent += 1
        poll(lambda: statuses() == dict.fromkeys(names, NOT_SERVING), 5)
        down_s = time.monotonic() - last_fault_s  # from before the request that took the last core out
        assert down_s < 1.0, down_s
        assert ready() == (False, False)
        assert stubs.health.Check(health_pb2.HealthCheckRequest(service="grpc.health.v1.Health"), timeout=5).status == SERVING
        # no core: a Score is UNAVAILABLE, naming why
        error = rpc_error(stubs.scorer.Score, good, timeout=10)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "no healthy core group" in error.details()

        poll(lambda: statuses() == dict.fromkeys(names, SERVING), RESET_S + 2)
        assert ready() == (True, True)
        np.testing.assert_array_equal(array(stubs.scorer.Score(good, timeout=10).scores), expected)
        poll(lambda: watched == [SERVING, NOT_SERVING, SERVING], 5)
        watch.cancel()
        reader.join(5)
        no_tracebacks(caplog)
    finally:
        stubs.channel.close()


PIPELINED = "user_tower=0,peer_tower=1,pair_scorer=2"


@pytest.fixture(scope="module")
def pipelined_server(loop_thread, small_artifact):
    server = start_server(loop_thread, small_artifact, backend="sim", cores=3, placement=PIPELINED, sim=SimConfig(latency_scale=0.0, reset_s=RESET_S))
    yield server
    loop_thread.run(server.stop(5.0))


def test_a_stage_out_of_rotation_is_visible_per_service_and_per_model_and_back_after_the_reset(pipelined_server, caplog):
    """The user tower's only core faults: the Scorer and "" are NOT_SERVING and the models that run the
    user tower are not ready, while the OIP service still serves the peer tower; all back after the reset."""
    stubs = Stubs(pipelined_server.port)
    try:
        names = ("", "neuronserve.v1.Scorer", "inference.GRPCInferenceService", "grpc.health.v1.Health")
        models = ("twotower", "user_tower", "peer_tower")

        def seen():
            health = tuple(stubs.health.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status for n in names)
            ready = tuple(stubs.oip.ModelReady(oip.ModelReadyRequest(name=m), timeout=5).ready for m in models)
            return health, ready, stubs.oip.ServerReady(oip.ServerReadyRequest(), timeout=5).ready

        everything = ((SERVING,) * 4, (True, True, True), True)
        assert seen() == everything
        pipelined_server.backend.inject_fault(0, "fail")  # core 0 holds user_tower only
        good = score_request(rng_features(5, 1, F), rng_features(6, 7, F))
        assert rpc_error(stubs.scorer.Score, good, timeout=10).code() == grpc.StatusCode.UNAVAILABLE
        partly = ((NOT_SERVING, NOT_SERVING, SERVING, SERVING), (False, False, True), False)
        poll(lambda: seen() == partly, 5)
        assert "no core group can run user_tower" in caplog.text
        poll(lambda: seen() == everything, RESET_S + 2)
        no_tracebacks(caplog)
    finally:
        stubs.channel.close()


@pytest.mark.parametrize(
    "placement, cores, faulted, down",
    [
        ("data", 2, [0], set()),  # one group of two still runs everything
        ("data", 2, [0, 1], {"user_tower", "peer_tower", "pair_scorer", "twotower"}),
        (PIPELINED, 3, [1], {"peer_tower"}),  # peer_tower's only group
        (PIPELINED, 3, [0, 2], {"user_tower", "pair_scorer"}),
        (PIPELINED, 3, [], set()),
    ],
)
def test_a_stage_is_down_while_every_group_holding_it_is_out_of_rotation_and_back_after_the_reset(small_artifact, placement, cores, faulted, down):
    from neuronserve.backends.sim import SimBackend
    from neuronserve.config import Placement
    from neuronserve.errors import CoreFault
    from neuronserve.pipeline import Pipeline

    now = [0.0]
    sim = SimBackend(small_artifact, SimConfig(num_cores=cores, latency_scale=0.0, reset_s=1.0), clock=lambda: now[0], sleep=lambda s: None)
    layout = Placement.data_parallel(cores) if placement == "data" else Placement.parse(placement, cores)
    pipeline = Pipeline(sim, layout)
    pipeline.start()
    try:
        stage_of = {0: "user_tower", 1: "peer_tower", 2: "pair_scorer"}

        async def fault(core: int) -> None:
            sim.inject_fault(core, "fail")
            stage = "user_tower" if placement == "data" else stage_of[core]
            inputs = [np.zeros((1,) + shape, np.float32) for shape in pipeline._shapes[stage]]
            with pytest.raises(CoreFault):
                await pipeline.run_stage(stage, inputs)

        async def main():
            assert pipeline.stages_down() == set()
            for core in faulted:
                await fault(core)
            now[0] = 0.5  # inside the reset
            assert pipeline.stages_down() == down
            now[0] = 1.0  # the reset is over
            assert pipeline.stages_down() == set()

        asyncio.run(main())
    finally:
        pipeline.close()


# ---- the watcher on a fake clock ---------------------------------------------------------------


class FakeClock:
    """asyncio sleeps on a clock the test advances: a sleeper wakes when the clock reaches its end."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers = []  # (wake time, future)

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move to now + seconds, stopping at each wake-up in between so every poll runs at its time."""
        end = self.now + seconds
        while True:
            await _settle()
            due = [t for t, f in self._sleepers if not f.done()]
            if not due or min(due) > end:
                break
            self.now = max(self.now, min(due))
            for t, f in self._sleepers:
                if t <= self.now and not f.done():
                    f.set_result(None)
            self._sleepers = [(t, f) for t, f in self._sleepers if not f.done()]
        self.now = end
        await _settle()


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_the_device_watcher_tells_each_change_once_within_one_interval(caplog):
    async def main():
        clock = FakeClock()
        device = {"healthy": True, "raise": False}
        changes = []

        def probe():
            if device["raise"]:
                raise RuntimeError("probe broke")
            return device["healthy"]

        async def on_change(healthy: bool) -> None:
            changes.append((clock.now, healthy))

        watcher = DeviceWatcher(probe, on_change, initial=True, failed=False, interval_s=0.1, sleep=clock.sleep)
        watcher.start()
        await clock.advance(5.0)
        assert changes == []  # healthy from the start: nothing to tell

        device["healthy"] = False
        lost_s = clock.now
        await clock.advance(1.0)
        assert [h for _, h in changes] == [False] and changes[0][0] - lost_s <= 0.1 + 1e-9
        await clock.advance(10.0)
        assert len(changes) == 1  # told once, not per poll

        device["healthy"] = True
        back_s = clock.now
        await clock.advance(1.0)
        assert [h for _, h in changes] == [False, True] and changes[1][0] - back_s <= 0.1 + 1e-9

        device["raise"] = True  # a probe that fails is unhealthy, logged once
        await clock.advance(5.0)
        assert [h for _, h in changes] == [False, True, False]
        assert caplog.text.count("probe failed") == 1
        device["raise"] = False
        await clock.advance(0.2)
        assert [h for _, h in changes] == [False, True, False, True]

        await watcher.stop()
        device["healthy"] = False
        await clock.advance(5.0)
        assert len(changes) == 4  # stopped: no call after stop()

    with caplog.at_level(logging.ERROR, logger="neuronserve.health"):
        asyncio.run(main())


def calls_started_in_grpc_core() -> int:
    """Calls every gRPC server of this process has received (channelz, read without their event loops)."""
    from grpc._cython import cygrpc

    servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
    return sum(int(s["data"].get("callsStarted", 0)) for s in servers)


def test_calls_queued_behind_a_busy_loop_when_the_drain_starts_are_answered_not_cancelled(loop_thread, small_artifact):
    # under load, calls wait in gRPC's core until the loop picks them up: the drain must pick up every
    # one (an answer, or UNAVAILABLE, which clients retry) before it stops gRPC, which cancels the rest
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=1, max_pending_rpcs=None)
    stubs = Stubs(server.port)
    request = score_request(rng_features(1, 1, F), rng_features(2, 4, F))
    stubs.scorer.Score(request, timeout=20)
    before, busy = calls_started_in_grpc_core(), threading.Event()
    loop_thread.loop.call_soon_threadsafe(busy.wait, 30)  # the loop is busy, as under load
    calls = [stubs.scorer.Score.future(request, timeout=30) for _ in range(60)]
    try:
        wait_until(lambda: calls_started_in_grpc_core() >= before + len(calls))  # all in the core, none picked up
        stopping = asyncio.run_coroutine_threadsafe(server.stop(5.0), loop_thread.loop)
    finally:
        busy.set()
    stopping.result(30)
    codes = collections.Counter(call.code().name for call in calls)
    stubs.channel.close()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
