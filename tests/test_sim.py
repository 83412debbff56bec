"""The simulated NeuronCores: exact outputs, compiled shapes only, two executions in flight per core
(host phase overlapping the other's device phase, device time serialized per core), groups for
pipelined graphs, the latency model and its clock, fault injection and reset, the ideal throughput.

Timing is tested on a virtual clock (VirtualClock): no test sleeps or reads the wall clock."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Callable, Dict, List

import numpy as np
import pytest

from neuronserve.artifact import FUSED_STAGE, Manifest, ModelConfig, load_manifest
from neuronserve.backends.base import Backend
from neuronserve.backends.cpu import CpuBackend
from neuronserve.backends.sim import (
    IN_FLIGHT_PER_CORE,
    FusedLatency,
    LatencyModel,
    SimBackend,
    StageLatency,
)
from neuronserve.config import STAGES, CoreGroup, SimConfig
from neuronserve.errors import ConfigError, CoreFault, InvalidInput, NeuronServeError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def manifest(small_artifact):
    """The small artifact (conftest): buckets like (1, 4, 16), so splitting is cheap to exercise."""
    return small_artifact if isinstance(small_artifact, Manifest) else load_manifest(small_artifact)


class VirtualClock:
    """Virtual time for threads: sleep(dt) blocks until the clock reaches now + dt, and the clock jumps
    to the earliest wake-up once every party (a thread started by run_together; none: the caller
    alone) is asleep or done. Deterministic in virtual time whatever the host's scheduling."""

    def __init__(self) -> None:
        self.now = 0.0
        self._parties = 0
        self._wakeups: List[float] = []
        self._cond = threading.Condition()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._cond:
            target = self.now + max(seconds, 0.0)
            self._wakeups.append(target)
            self._advance()
            while self.now < target:
                assert self._cond.wait(timeout=20), "the virtual clock stalled"
            self._wakeups.remove(target)

    def join(self, parties: int) -> None:
        with self._cond:
            self._parties += parties

    def done(self) -> None:
        with self._cond:
            self._parties -= 1
            self._advance()

    def _advance(self) -> None:
        if self._wakeups and len(self._wakeups) >= self._parties:
            self.now = max(self.now, min(self._wakeups))
            self._cond.notify_all()


def run_together(clock: VirtualClock, *jobs: Callable[[], object]) -> List[Dict[str, object]]:
    """Each job on its own thread, as parties of `clock`; per job {"out" or "error", "at": virtual time it ended}."""
    outcomes: List[Dict[str, object]] = [{} for _ in jobs]

    def target(job, outcome):
        try:
            outcome["out"] = job()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
        finally:
            outcome["at"] = clock()
            clock.done()

    clock.join(len(jobs))
    threads = [threading.Thread(target=target, args=(job, outcome)) for job, outcome in zip(jobs, outcomes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    return outcomes


def after(clock: VirtualClock, start_s: float, job: Callable[[], object]) -> Callable[[], object]:
    """`job`, started at virtual time `start_s`."""

    def delayed():
        clock.sleep(start_s - clock())
        return job()

    return delayed


class _Wrapped:
    """A CPU runner whose host phase first calls `before()` (advance a clock, wait on a gate)."""

    def __init__(self, inner, before: Callable[[], None]) -> None:
        self._inner = inner
        self._before = before

    def __getattr__(self, name):  # batch_sizes, input_shapes, pairs, ...: the CPU runner's
        return getattr(self._inner, name)

    def run(self, inputs):
        self._before()
        return self._inner.run(inputs)


class HostBackend(Backend):
    """CpuBackend with a host phase: every run first calls `before(cores)`."""

    name = "cpu"

    def __init__(self, manifest: Manifest, before: Callable[[CoreGroup], None]) -> None:
        super().__init__(manifest)
        self._cpu = CpuBackend(manifest)
        self._before = before

    def load(self, stage, cores):
        return _Wrapped(self._cpu.load(stage, cores), lambda: self._before(cores))


def virtual_sim(manifest, clock: VirtualClock, host_s: float, model: LatencyModel, **settings) -> SimBackend:
    """A sim on `clock` whose host phase (the CPU graph) takes `host_s` virtual seconds."""
    in_flight = settings.pop("in_flight_per_core", IN_FLIGHT_PER_CORE)
    inner = HostBackend(manifest, lambda cores: clock.sleep(host_s))
    return SimBackend(manifest, SimConfig(**settings), latency=model, inner=inner, in_flight_per_core=in_flight, clock=clock, sleep=clock.sleep)


def flat_latency(seconds: float) -> LatencyModel:
    return LatencyModel({stage: StageLatency(seconds, 0.0) for stage in STAGES})


def features(manifest, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, manifest.model_config.peer_features)).astype(np.float32)


def test_default_latency_model_follows_the_stated_derivation():
    model = LatencyModel.estimate(ModelConfig())
    tower = model.stages["user_tower"]
    assert tower.fixed_s == pytest.approx(0.5e-3)
    # 82 kMAC at 3.3e12 MAC/s + 1,280 bytes at 1 GB/s
    assert tower.per_row_s == pytest.approx(81920 / 3.3e12 + 1280 / 1e9)
    assert model.latency_s("user_tower", 1024) == pytest.approx(1.84e-3, rel=0.01)
    assert model.latency_s("pair_scorer", 1) < model.latency_s("pair_scorer", 1024)
    # fused: one overhead; a user row is its tower's MACs + 256 bytes in; a peer row its tower's and
    # the 256 dot-product MACs + 256 bytes of features, 8 of index and 16 of scores
    fused = model.fused
    assert fused.fixed_s == pytest.approx(0.5e-3)
    assert fused.user_row_s == pytest.approx(81920 / 3.3e12 + 256 / 1e9)
    assert fused.peer_row_s == pytest.approx((81920 + 256) / 3.3e12 + 280 / 1e9)
    assert model.latency_s(FUSED_STAGE, 1024, 8) == pytest.approx(0.815e-3, rel=0.01)
    three_stages = sum(model.latency_s(s, b) for s, b in (("user_tower", 8), ("peer_tower", 1024), ("pair_scorer", 1024)))
    assert model.latency_s(FUSED_STAGE, 1024, 8) < three_stages / 4  # one overhead, no tower outputs copied
    with pytest.raises(ValueError, match="user batch"):
        model.latency_s(FUSED_STAGE, 1024)


def test_fused_latency_from_the_stages_when_not_given():
    model = LatencyModel({"user_tower": StageLatency(1.0, 0.1), "peer_tower": StageLatency(2.0, 0.2), "pair_scorer": StageLatency(3.0, 0.3)})
    assert model.fused_latency() == FusedLatency(1.0, 0.1, 0.5)
    assert model.latency_s(FUSED_STAGE, 10, 2) == pytest.approx(1.0 + 0.1 * 2 + 0.5 * 10)


def test_outputs_equal_the_cpu_backend(manifest):
    sim = SimBackend(manifest, SimConfig(latency_scale=0.0))
    cpu = CpuBackend(manifest)
    x = features(manifest, manifest.stage("peer_tower").batch_sizes[-1])
    expected = cpu.load("peer_tower", CoreGroup(0)).run([x])
    got = sim.load("peer_tower", CoreGroup(3)).run([x])
    np.testing.assert_array_equal(got, expected)
    stats = sim.stats()
    assert stats.cores[3].executions == 1 and stats.executions["peer_tower"] == 1


def test_only_compiled_shapes_run(manifest):
    runner = SimBackend(manifest, SimConfig(latency_scale=0.0)).load("peer_tower", CoreGroup(0))
    uncompiled = max(runner.batch_sizes) + 1
    with pytest.raises(InvalidInput, match="compiled shapes"):
        runner.run([features(manifest, uncompiled)])
    with pytest.raises(InvalidInput, match="compiled shapes"):
        runner.run([np.zeros((1, manifest.model_config.peer_features + 1), np.float32)])
    with pytest.raises(InvalidInput, match="float32"):
        runner.run([features(manifest, 1).astype(np.float64)])
    with pytest.raises(InvalidInput, match="2 input"):
        SimBackend(manifest, SimConfig(latency_scale=0.0)).load("pair_scorer", CoreGroup(0)).run([features(manifest, 1)])


def test_execution_takes_host_then_device_time_and_the_clock_counts_device_time(manifest):
    clock = VirtualClock()
    latency = LatencyModel({stage: StageLatency(2.0, 0.25) for stage in STAGES})  # modelled seconds
    sim = virtual_sim(manifest, clock, 0.5, latency, num_cores=1, latency_scale=0.01)
    runner = sim.load("peer_tower", CoreGroup(0))
    runner.run([features(manifest, 4)])
    assert clock.now == pytest.approx(0.5 + 3.0 * 0.01)  # alone on the core: host, then device
    runner.run([features(manifest, 1)])
    assert clock.now == pytest.approx(0.5 + 3.0 * 0.01 + 0.5 + 2.25 * 0.01)
    core = sim.stats().cores[0]
    assert core.executions == 2 and core.in_flight == 0
    assert core.busy_s == pytest.approx(3.0 + 2.25)  # modelled device seconds, independent of latency_scale and host time
    assert runner.latency_s(4) == pytest.approx(0.03)


@pytest.mark.parametrize("in_flight, total_s", [(2, 1.0 + 6 * 1.5), (1, 6 * (1.0 + 1.5))])
def test_two_in_flight_hide_the_host_behind_the_device(manifest, in_flight, total_s):
    """Six back-to-back executions, 1 s host + 1.5 s device each (3 modelled s at scale 0.5): with two
    in flight the device runs back to back after the first host phase; with one, host and device alternate."""
    clock = VirtualClock()
    sim = virtual_sim(manifest, clock, 1.0, flat_latency(3.0), num_cores=1, latency_scale=0.5, in_flight_per_core=in_flight)
    runner = sim.load("peer_tower", CoreGroup(0))
    assert runner.max_in_flight == in_flight
    x = features(manifest, 1)
    before = sim.stats()

    def runs():  # one caller per slot, back to back: never more in flight than the core accepts
        for _ in range(6 // in_flight):
            runner.run([x])

    outcomes = run_together(clock, *[runs] * in_flight)
    assert all("error" not in o for o in outcomes)
    assert clock.now == pytest.approx(total_s)
    now = sim.stats()
    assert now.cores[0].busy_s - before.cores[0].busy_s == pytest.approx(18.0)
    assert now.busy_fractions(before) == pytest.approx((18.0 * 0.5 / total_s,))  # 0.9 with two in flight
    assert now.utilisation(before) == pytest.approx(9.0 / total_s)
    assert now.peak_in_flight == in_flight


def test_device_time_on_one_core_never_overlaps(manifest):
    """Three executions accepted at once (no host time, 2 s device): the two on core 0 run one after
    the other even though both were accepted; the one on core 1 runs beside them."""
    clock = VirtualClock()
    sim = virtual_sim(manifest, clock, 0.0, flat_latency(2.0), num_cores=2)
    peer0, user0, peer1 = sim.load("peer_tower", CoreGroup(0)), sim.load("user_tower", CoreGroup(0)), sim.load("peer_tower", CoreGroup(1))
    x = features(manifest, 1)
    u = np.zeros((1, manifest.model_config.user_features), np.float32)
    outcomes = run_together(clock, lambda: peer0.run([x]), lambda: user0.run([u]), lambda: peer1.run([x]))
    assert all("error" not in o for o in outcomes)
    assert sorted(o["at"] for o in outcomes[:2]) == pytest.approx([2.0, 4.0])
    assert outcomes[2]["at"] == pytest.approx(2.0)
    assert [c.busy_s for c in sim.stats().cores] == pytest.approx([4.0, 2.0])


class Gate:
    """Holds host phases until opened; `wait_entered(n)` returns once n of them are held."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._entered = threading.Semaphore(0)

    def hold(self) -> None:
        self._entered.release()
        assert self._open.wait(timeout=20)

    def wait_entered(self, count: int) -> None:
        for _ in range(count):
            assert self._entered.acquire(timeout=20)

    def open(self) -> None:
        self._open.set()


def gated_sim(manifest, gate: Gate, gated_cores, **settings):
    """A sim (latency 0) whose host phases on `gated_cores` wait for the gate."""
    inner = HostBackend(manifest, lambda cores: gate.hold() if set(cores.cores) & set(gated_cores) else None)
    return SimBackend(manifest, SimConfig(latency_scale=0.0, **settings), latency=flat_latency(1.0), inner=inner)


def run_in_thread(job) -> tuple:
    outcome: Dict[str, object] = {}

    def target():
        try:
            outcome["out"] = job()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_a_third_execution_on_a_one_core_group_is_refused(manifest):
    gate = Gate()
    sim = gated_sim(manifest, gate, gated_cores=(0,), num_cores=2)
    runner, other_stage_same_core, other_core = (
        sim.load("peer_tower", CoreGroup(0)), sim.load("user_tower", CoreGroup(0)), sim.load("peer_tower", CoreGroup(1))
    )
    assert runner.max_in_flight == 2
    x = features(manifest, 1)
    runs = [run_in_thread(lambda: runner.run([x])) for _ in range(2)]
    gate.wait_entered(2)  # both accepted on core 0, in their host phase
    assert sim.stats().cores[0].in_flight == 2
    with pytest.raises(NeuronServeError, match="oversubscribed"):
        runner.run([x])
    with pytest.raises(NeuronServeError, match="oversubscribed"):
        other_stage_same_core.run([np.zeros((1, manifest.model_config.user_features), np.float32)])
    other_core.run([x])  # a different core is free
    gate.open()
    for thread, outcome in runs:
        thread.join(timeout=20)
        assert "out" in outcome
    stats = sim.stats()
    assert stats.peak_in_flight == 3 and stats.cores[0].executions == 2 and stats.cores[0].in_flight == 0


def test_pipelined_group_holds_two_per_core(manifest):
    pipelined = dataclasses.replace(manifest, pipeline_cores=2)
    gate = Gate()
    inner = HostBackend(pipelined, lambda cores: gate.hold())
    sim = SimBackend(pipelined, SimConfig(num_cores=4, latency_scale=0.0), latency=flat_latency(1.0), inner=inner)
    with pytest.raises(ConfigError, match="pipeline_cores=2"):
        sim.load("peer_tower", CoreGroup(0))
    with pytest.raises(ConfigError, match="cores 0-3"):
        sim.load("peer_tower", CoreGroup(3, 2))
    runner = sim.load("peer_tower", CoreGroup(0, 2))
    assert runner.max_in_flight == 4
    x = features(manifest, 1)
    runs = [run_in_thread(lambda: runner.run([x])) for _ in range(4)]
    gate.wait_entered(4)
    assert [c.in_flight for c in sim.stats().cores] == [2, 2, 0, 0]  # spread over the group's cores
    with pytest.raises(NeuronServeError, match="oversubscribed"):
        runner.run([x])
    gate.open()
    for thread, outcome in runs:
        thread.join(timeout=20)
        assert "out" in outcome
    stats = sim.stats()
    assert stats.peak_in_flight == 4 and stats.executions["peer_tower"] == 4


def test_in_flight_per_core_is_configurable(manifest):
    sim = SimBackend(manifest, SimConfig(latency_scale=0.0), in_flight_per_core=1)
    assert sim.load("peer_tower", CoreGroup(0, 2)).max_in_flight == 2
    with pytest.raises(ConfigError, match="in_flight_per_core"):
        SimBackend(manifest, SimConfig(latency_scale=0.0), in_flight_per_core=0)


@pytest.mark.parametrize("kind", ["fail", "hang"])
def test_fault_takes_the_core_out_until_reset(manifest, kind):
    clock = VirtualClock()
    sim = virtual_sim(manifest, clock, 0.0, flat_latency(1.0), num_cores=2, core_timeout_s=0.2, reset_s=0.3)
    runner = sim.load("peer_tower", CoreGroup(1))
    x = features(manifest, 1)
    sim.inject_fault(1, kind)
    expected = "hung past its timeout of 0.2 s" if kind == "hang" else "core 1 failed"
    with pytest.raises(CoreFault, match=expected):
        runner.run([x])
    shown_s = 0.2 if kind == "hang" else 0.0
    assert clock.now == pytest.approx(shown_s)  # a hang costs its caller the timeout
    assert not runner.healthy()
    with pytest.raises(CoreFault, match="resetting"):
        runner.run([x])
    assert sim.load("peer_tower", CoreGroup(0)).healthy()  # other cores unaffected
    clock.sleep(0.3)
    assert runner.healthy()
    runner.run([x])
    assert clock.now == pytest.approx(shown_s + 0.3 + 1.0)
    core = sim.stats().cores[1]
    assert (core.faults, core.executions, core.healthy, core.busy_s) == (1, 1, True, 1.0)


@pytest.mark.parametrize("kind, shown_s", [("fail", 1.0), ("hang", 1.2)])
def test_a_fault_fails_only_its_execution_the_one_behind_it_runs_after_the_reset(manifest, kind, shown_s):
    """Core 0, 1 s host, 2 s device, 0.5 s reset. A (faulted) at 0: its device phase starts at 1, the
    fault shows at 1 (fail) or 1.2 (hang), the core is back at 1.5 or 1.7. B, accepted at 0.5 while the
    core looked healthy, keeps its place behind A: its device phase starts when the reset ends. C at
    2.0 (core back in rotation): host 2-3, device after B's."""
    clock = VirtualClock()
    sim = virtual_sim(manifest, clock, 1.0, flat_latency(2.0), num_cores=1, core_timeout_s=0.2, reset_s=0.5)
    runner = sim.load("peer_tower", CoreGroup(0))
    x = features(manifest, 1)
    sim.inject_fault(0, kind)
    a, b, c, probe = run_together(
        clock,
        lambda: runner.run([x]),
        after(clock, 0.5, lambda: runner.run([x])),
        after(clock, 2.0, lambda: runner.run([x])),
        after(clock, 1.1, lambda: runner.healthy()),
    )
    assert isinstance(a["error"], CoreFault) and ("hung" if kind == "hang" else "failed") in str(a["error"])
    assert a["at"] == pytest.approx(shown_s)
    assert probe["out"] is (kind == "hang")  # at 1.1 a hang has not shown yet; a failure has
    back_s = shown_s + 0.5
    assert "out" in b and b["at"] == pytest.approx(back_s + 2.0)
    assert "out" in c and c["at"] == pytest.approx(back_s + 4.0)
    core = sim.stats().cores[0]
    assert (core.faults, core.executions, core.busy_s) == (1, 2, 4.0)


def test_an_execution_ahead_of_a_fault_finishes(manifest):
    """A at 0 (host 0-1, device 1-3); B faulted, accepted at 0.5, host done at 1.5: its device phase
    would start at 3, after A's, so A finishes and B fails at 3."""
    clock = VirtualClock()
    sim = virtual_sim(manifest, clock, 1.0, flat_latency(2.0), num_cores=1, reset_s=0.5)
    runner = sim.load("peer_tower", CoreGroup(0))
    x = features(manifest, 1)

    def faulted():
        sim.inject_fault(0, "fail")
        return runner.run([x])

    a, b = run_together(clock, lambda: runner.run([x]), after(clock, 0.5, faulted))
    assert "out" in a and a["at"] == pytest.approx(3.0)
    assert isinstance(b["error"], CoreFault) and "core 0 failed" in str(b["error"]) and b["at"] == pytest.approx(3.0)
    assert not sim.healthy(CoreGroup(0))
    clock.sleep(0.5)
    assert sim.healthy(CoreGroup(0))


def test_fault_injection_is_validated(manifest):
    sim = SimBackend(manifest, SimConfig(num_cores=4, latency_scale=0.0))
    with pytest.raises(InvalidInput, match="0-3"):
        sim.inject_fault(4, "fail")
    with pytest.raises(InvalidInput, match="fail, hang"):
        sim.inject_fault(0, "melt")


def test_ideal_throughput_is_full_buckets_back_to_back(manifest):
    model = LatencyModel({stage: StageLatency(0.5, 0.01) for stage in STAGES})
    sim = SimBackend(manifest, SimConfig(num_cores=4, latency_scale=2.0), latency=model)
    largest = manifest.stage("peer_tower").batch_sizes[-1]
    full_s = (0.5 + 0.01 * largest) * 2.0
    assert sim.full_bucket_s("peer_tower") == pytest.approx(full_s)
    assert sim.ideal_rows_per_s("peer_tower") == pytest.approx(4 * largest / full_s)
    assert sim.ideal_rows_per_s("peer_tower", 1) == pytest.approx(largest / full_s)
    assert SimBackend(manifest, SimConfig(latency_scale=0.0), latency=model).ideal_rows_per_s("peer_tower") == math.inf


def fused_manifest(manifest) -> Manifest:
    if not manifest.has_fused_stage:
        pytest.skip(f"the small artifact has no {FUSED_STAGE} stage")
    return manifest


def test_fused_ideal_throughput_counts_peer_rows(manifest):
    manifest = fused_manifest(manifest)
    model = LatencyModel({stage: StageLatency(0.5, 0.01) for stage in STAGES}, FusedLatency(0.5, 0.1, 0.02))
    sim = SimBackend(manifest, SimConfig(num_cores=4, latency_scale=2.0), latency=model)
    spec = manifest.stage(FUSED_STAGE)
    largest = spec.batch_sizes[-1]
    users = spec.user_batch_sizes(largest)  # e.g. (1, 4, 16)
    assert sim.ideal_rows_per_s(FUSED_STAGE, 2) == pytest.approx(2 * largest / ((0.5 + 0.1 * users[0] + 0.02 * largest) * 2.0))
    wanted = users[0] + 1  # the smallest compiled U that holds it
    u = next(u for u in users if u >= wanted)
    assert sim.full_bucket_s(FUSED_STAGE, wanted) == pytest.approx((0.5 + 0.1 * u + 0.02 * largest) * 2.0)


def test_fused_stage_runs_as_one_execution_with_exact_outputs(manifest):
    manifest = fused_manifest(manifest)
    clock = VirtualClock()
    model = LatencyModel({stage: StageLatency(0.5, 0.01) for stage in STAGES}, FusedLatency(0.5, 0.1, 0.02))
    sim = virtual_sim(manifest, clock, 0.0, model, num_cores=1)
    runner = sim.load(FUSED_STAGE, CoreGroup(0))
    cpu = CpuBackend(manifest).load(FUSED_STAGE, CoreGroup(0))
    assert runner.max_in_flight == 2 and runner.pairs == cpu.pairs
    batch = runner.batch_sizes[-1]
    users = runner.user_batch_sizes(batch)[0]
    cfg = manifest.model_config
    rng = np.random.default_rng(1)
    inputs = [
        rng.standard_normal((users, cfg.user_features)).astype(np.float32),
        rng.standard_normal((batch, cfg.peer_features)).astype(np.float32),
        rng.integers(0, users, batch).astype(np.int64),
    ]
    np.testing.assert_array_equal(runner.run(inputs), cpu.run(inputs))
    expected_s = 0.5 + 0.1 * users + 0.02 * batch
    assert clock.now == pytest.approx(expected_s)
    assert runner.latency_s(batch, users) == pytest.approx(expected_s)
    stats = sim.stats()
    assert stats.executions[FUSED_STAGE] == 1 and stats.cores[0].busy_s == pytest.approx(expected_s)
    with pytest.raises(InvalidInput):
        runner.run([inputs[0], inputs[1][:-1], inputs[2][:-1]])  # not a compiled (B, U) pair
