"""The simulated NeuronCores: exact outputs, compiled shapes only, one execution per core, groups for
pipelined graphs, the latency model and its clock, fault injection and reset."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest

from neuronserve.artifact import Manifest, ModelConfig, load_manifest
from neuronserve.backends.cpu import CpuBackend
from neuronserve.backends.sim import LatencyModel, SimBackend, StageLatency
from neuronserve.config import STAGES, CoreGroup, SimConfig
from neuronserve.errors import ConfigError, CoreFault, InvalidInput, NeuronServeError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def manifest(small_artifact):
    """The small artifact (conftest): buckets like (1, 4, 16), so splitting is cheap to exercise."""
    return small_artifact if isinstance(small_artifact, Manifest) else load_manifest(small_artifact)


def flat_latency(seconds: float) -> LatencyModel:
    return LatencyModel({stage: StageLatency(seconds, 0.0) for stage in STAGES})


def features(manifest, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, manifest.model_config.peer_features)).astype(np.float32)


def run_in_thread(runner, inputs):
    """Start runner.run(inputs) on a thread; returns (thread, outcome dict)."""
    outcome = {}

    def target():
        try:
            outcome["out"] = runner.run(inputs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_in_flight(sim: SimBackend, count: int) -> None:
    deadline = time.monotonic() + 10
    while sim.stats().peak_in_flight < count:
        assert time.monotonic() < deadline, f"never saw {count} execution(s) in flight"
        time.sleep(0.005)


def test_default_latency_model_follows_the_stated_derivation():
    model = LatencyModel.estimate(ModelConfig())
    tower = model.stages["user_tower"]
    assert tower.fixed_s == pytest.approx(0.5e-3)
    # 82 kMAC at 3.3e12 MAC/s + 1,280 bytes at 1 GB/s
    assert tower.per_row_s == pytest.approx(81920 / 3.3e12 + 1280 / 1e9)
    assert model.latency_s("user_tower", 1024) == pytest.approx(1.84e-3, rel=0.01)
    assert model.latency_s("pair_scorer", 1) < model.latency_s("pair_scorer", 1024)


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


def test_one_execution_at_a_time_per_core(manifest):
    sim = SimBackend(manifest, SimConfig(num_cores=2), latency=flat_latency(0.5))
    runner = sim.load("peer_tower", CoreGroup(0))
    other_stage_same_core = sim.load("user_tower", CoreGroup(0))
    other_core = sim.load("peer_tower", CoreGroup(1))
    x = features(manifest, 1)
    thread, outcome = run_in_thread(runner, [x])
    wait_in_flight(sim, 1)
    with pytest.raises(NeuronServeError, match="oversubscribed"):
        runner.run([x])
    with pytest.raises(NeuronServeError, match="oversubscribed"):
        other_stage_same_core.run([np.zeros((1, manifest.model_config.user_features), np.float32)])
    other_core.run([x])  # a different core is free
    thread.join()
    assert "error" not in outcome
    assert sim.stats().peak_in_flight == 2


def test_execution_takes_the_modelled_time_and_clock_counts_it(manifest):
    latency = LatencyModel({stage: StageLatency(2.0, 0.25) for stage in STAGES})  # modelled seconds
    sim = SimBackend(manifest, SimConfig(num_cores=1, latency_scale=0.01), latency=latency)
    runner = sim.load("peer_tower", CoreGroup(0))
    start = time.perf_counter()
    runner.run([features(manifest, 4)])
    runner.run([features(manifest, 1)])
    assert time.perf_counter() - start >= (3.0 + 2.25) * 0.01  # a lower bound, never an upper one
    core = sim.stats().cores[0]
    assert core.executions == 2
    assert core.busy_s == pytest.approx(3.0 + 2.25)  # modelled seconds, independent of latency_scale
    assert runner.latency_s(4) == pytest.approx(0.03)


def test_pipelined_group_holds_n_in_flight(manifest):
    pipelined = dataclasses.replace(manifest, pipeline_cores=2)
    sim = SimBackend(pipelined, SimConfig(num_cores=4), latency=flat_latency(0.5))
    with pytest.raises(ConfigError, match="pipeline_cores=2"):
        sim.load("peer_tower", CoreGroup(0))
    with pytest.raises(ConfigError, match="cores 0-3"):
        sim.load("peer_tower", CoreGroup(3, 2))
    runner = sim.load("peer_tower", CoreGroup(0, 2))
    assert runner.max_in_flight == 2
    x = features(manifest, 1)
    runs = [run_in_thread(runner, [x]) for _ in range(2)]
    wait_in_flight(sim, 2)
    with pytest.raises(NeuronServeError, match="oversubscribed"):
        runner.run([x])
    for thread, outcome in runs:
        thread.join()
        assert "out" in outcome
    stats = sim.stats()
    assert stats.peak_in_flight == 2 and stats.executions["peer_tower"] == 2


@pytest.mark.parametrize("kind", ["fail", "hang"])
def test_fault_takes_the_core_out_until_reset(manifest, kind):
    sim = SimBackend(manifest, SimConfig(num_cores=2, latency_scale=0.0, core_timeout_s=0.2, reset_s=0.3))
    runner = sim.load("peer_tower", CoreGroup(1))
    x = features(manifest, 1)
    sim.inject_fault(1, kind)
    start = time.monotonic()
    expected = "hung past its timeout of 0.2 s" if kind == "hang" else "core 1 failed"
    with pytest.raises(CoreFault, match=expected):
        runner.run([x])
    if kind == "hang":
        assert time.monotonic() - start >= 0.2
    assert not runner.healthy()
    with pytest.raises(CoreFault, match="resetting"):
        runner.run([x])
    assert sim.load("peer_tower", CoreGroup(0)).healthy()  # other cores unaffected
    time.sleep(0.35)
    assert runner.healthy()
    runner.run([x])
    core = sim.stats().cores[1]
    assert (core.faults, core.executions, core.healthy) == (1, 1, True)


def test_fault_injection_is_validated(manifest):
    sim = SimBackend(manifest, SimConfig(num_cores=4, latency_scale=0.0))
    with pytest.raises(InvalidInput, match="0-3"):
        sim.inject_fault(4, "fail")
    with pytest.raises(InvalidInput, match="fail, hang"):
        sim.inject_fault(0, "melt")
