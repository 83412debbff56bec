"""Model lifecycle (issue 15): the repository and its version policy, the version table, experiments
(A/B and switch-back on a fake clock), and a real server loading, switching and unloading versions
while clients keep scoring (tritonclient's repository calls in a subprocess: its generated code and
neuronserve's open_inference_pb2 share protobuf package `inference`, see test_oip_triton.py)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError, InvalidInput, NotFound
from neuronserve.experiments import ABTest, Experiment, SwitchBack, user_bucket
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.repository import Repository, VersionPolicy, parse_version

from support import LoopThread, wait_until
from neuronserve.server import Server
from neuronserve.versions import ServedVersion, VersionTable

from tests.conftest import SMALL_BUCKETS, SMALL_CONFIG

pytestmark = pytest.mark.timeout(90)


# ---- repository and policy ----------------------------------------------------------------------


def test_version_names_are_canonical_positive_integers():
    assert [parse_version(t) for t in ("1", "42", "007", "0", "-1", "1.0", "v2", "٣", str(2**63))] == [1, 42, None, None, None, None, None, None, None]


@pytest.mark.parametrize("text, available, selected", [
    ("latest", [1, 3, 2], (3,)),
    ("latest:2", [1, 3, 2], (2, 3)),
    ("all", [5, 1], (1, 5)),
    ("specific:1,3", [1, 2, 3], (1, 3)),
    ("specific:4", [1, 2], ()),
])
def test_policy_selects(text, available, selected):
    assert VersionPolicy.parse(text).select(available) == selected


def test_policy_parse_and_triton_json():
    assert VersionPolicy.from_triton({"specific": {"versions": [2, 1]}}) == VersionPolicy("specific", versions=(1, 2))
    assert VersionPolicy.from_triton({"latest": {"num_versions": 2}}) == VersionPolicy("latest", latest=2)
    assert VersionPolicy.from_triton({"all": {}}).kind == "all"
    for bad in ("newest", "latest:0", "specific:", "specific:a", "all:3"):
        with pytest.raises(ConfigError):
            VersionPolicy.parse(bad)
    with pytest.raises(ConfigError):
        VersionPolicy.from_triton({"latest": {}, "all": {}})


def test_scan_lists_integer_versions_and_says_what_it_ignores(tmp_path):
    model = tmp_path / "twotower"
    for name in ("1", "3", "10", "007", "latest", ".staging"):
        (model / name).mkdir(parents=True)
    (model / "config.pbtxt").write_text("")
    repo = Repository(tmp_path)
    assert repo.only_model() == "twotower"
    scan = repo.scan("twotower", VersionPolicy.parse("latest:2"))
    assert scan.versions == (1, 3, 10) and scan.selected == (3, 10)
    assert scan.path(3) == model / "3"
    assert dict(scan.ignored) == {"007": "not a positive integer version", "config.pbtxt": "not a directory", "latest": "not a positive integer version"}
    with pytest.raises(NotFound):
        repo.scan("other")
    (tmp_path / "second").mkdir()
    with pytest.raises(ConfigError, match="2 models"):
        repo.only_model()


def test_an_artifact_is_a_one_version_repository(tmp_path):
    repo = Repository.of_artifact(tmp_path / "art", "twotower-demo", "0f3a9c")
    scan = repo.scan("twotower-demo")
    assert (scan.versions, scan.selected, scan.path(1)) == ((1,), (1,), tmp_path / "art")
    assert Repository.of_artifact(tmp_path / "art", "m", "7").scan("m").versions == (7,)


def test_settings_for_the_repository():
    with pytest.raises(ConfigError, match="needs a model repository"):
        ServerConfig(artifact="x", model_control="explicit")
    with pytest.raises(ConfigError, match="model_control"):
        ServerConfig(model_repository="r", model_control="sometimes")
    with pytest.raises(ConfigError, match="version policy"):
        ServerConfig(model_repository="r", version_policy="newest")
    ServerConfig(model_repository="r", model_control="poll", version_policy="latest:2")


# ---- the version table ------------------------------------------------------------------------


class _Info:
    def __init__(self, version: str) -> None:
        self.version = version


def _served(version: int, artifact: str) -> ServedVersion:
    return ServedVersion(version, _Info(artifact), runtime=object(), cache=object())


def test_table_serves_the_highest_by_default_and_any_by_name():
    seen = []
    table = VersionTable(_served(1, "aaa"))
    table.listen(seen.append)
    assert table.install(_served(3, "ccc")) is None
    assert table.install(_served(2, "bbb")) is None
    assert table.current.version == 3 and seen[-1] is table.current
    assert table.resolve("").version == 3 and table.resolve("2").version == 2 and table.resolve("aaa").version == 1
    with pytest.raises(NotFound, match="served versions: 1, 2, 3"):
        table.resolve("4")
    removed = table.remove(3)
    assert removed.version == 3 and table.current.version == 2 and seen[-1].version == 2
    assert not table.serves("ccc")
    table.remove(1)
    with pytest.raises(InvalidInput, match="only version"):
        table.remove(2)


# ---- experiments --------------------------------------------------------------------------------


def test_ab_at_ten_percent_over_100k_users_within_one_point_and_stable():
    test = ABTest(control=1, candidate=2, share=0.10)
    arms = [test.assign(user).arm for user in range(100_000)]
    share = arms.count("candidate") / len(arms)
    assert abs(share - 0.10) < 0.01, share
    again = [ABTest(control=1, candidate=2, share=0.10).assign(user).arm for user in range(0, 100_000, 997)]
    assert again == arms[::997]  # stable per user (the hash has no process state)
    assert user_bucket(123) == user_bucket(123) and 0 <= user_bucket(-5) < 10_000


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_switch_back_assigns_whole_windows_with_the_burn_in_on_a_fake_clock():
    day, window_s, burn_in_s = 86_400.0, 1_800.0, 300.0
    design = SwitchBack(control=1, candidate=2, seed=11, window_s=window_s, burn_in_s=burn_in_s, start_s=1_000.0)
    clock = FakeClock(design.start_s)
    experiment = Experiment(design, clock)
    schedule = design.schedule(design.start_s + day)
    assert len(schedule) == 48 and {w.arm for w in schedule} == {"control", "candidate"}
    assert [w.arm for w in schedule] == [w.arm for w in SwitchBack(1, 2, 11, window_s, burn_in_s, 1_000.0).schedule(design.start_s + day)]
    seen = {}
    for step in range(int(day // 60)):  # a request every simulated minute, from many users
        clock.t = design.start_s + step * 60.0 + 7.0
        got = experiment.assign(user_id=step * 7919)
        window = schedule[got.window]
        assert window.start_s <= clock.t < window.end_s
        assert got.arm == window.arm and got.version == (2 if window.arm == "candidate" else 1)
        switched = got.window > 0 and schedule[got.window - 1].arm != window.arm
        assert got.burn_in == (switched and clock.t < window.start_s + burn_in_s)
        seen.setdefault(got.window, set()).add(got.arm)
    assert all(len(arms) == 1 for arms in seen.values()) and len(seen) == 48  # whole windows
    assert experiment.assign(5, explicit_version=1).arm == "explicit"


def test_the_cli_reproduces_an_assignment():
    from neuronserve.cli import main

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["experiment", "assign", "--design", "switchback", "--seed", "11", "--window-s", "1800", "--burn-in-s", "300",
                     "--start", "1000", "--user", "9", "--time", "5000"]) == 0
    got = json.loads(out.getvalue())
    want = SwitchBack(1, 2, 11, 1800.0, 300.0, 1000.0).assign(5000.0)
    assert (got["arm"], got["version"], got["window"], got["burn_in"]) == (want.arm, want.version, want.window, want.burn_in)


# ---- a real server: load, switch, unload while serving -------------------------------------------


@pytest.fixture(scope="module")
def artifacts(small_artifact, tmp_path_factory):
    """Version 1: the session's small artifact (seed 7); version 2: the same model compiled with seed 8."""
    from neuronserve.compile import compile_artifact

    second = compile_artifact(tmp_path_factory.mktemp("v2") / "artifact", config=SMALL_CONFIG, batch_sizes=SMALL_BUCKETS, seed=8)
    assert second.model_version != small_artifact.model_version
    return small_artifact, second


def poll(predicate, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not reached in {timeout_s} s: {what}")
        time.sleep(0.01)


def tensor(array) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=array.tobytes(), shape=array.shape)


def scores(reply) -> np.ndarray:
    return np.frombuffer(reply.scores.data, "<f4").reshape(tuple(reply.scores.shape))


def flip_a_byte(artifact_dir: Path) -> str:
    stage = sorted(p for p in artifact_dir.iterdir() if p.name.startswith("user_tower"))[0]
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0x01
    stage.write_bytes(bytes(data))
    return stage.name


TRITON_SCRIPT = r'''
import json, sys
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

client = tc.InferenceServerClient(url=sys.argv[1])
report = {"index": [[m.name, m.version, m.state] for m in client.get_model_repository_index().models]}
client.unload_model("twotower")
report["ready_after_unload"] = client.is_model_ready("twotower")
try:
    client.load_model("nope")
except InferenceServerException as exc:
    report["unknown"] = str(exc.status())
client.load_model("twotower", config=json.dumps({"version_policy": {"specific": {"versions": [1, 2]}}}))
report["ready_after_load"] = [client.is_model_ready("twotower", v) for v in ("", "1", "2")]
report["index_after"] = [[m.name, m.version, m.state] for m in client.get_model_repository_index(as_json=False).models]
print(json.dumps(report))
'''


def test_repository_load_switch_and_unload_while_serving(artifacts, tmp_path):
    v1, v2 = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    loop = LoopThread()
    server = Server(ServerConfig(model_repository=str(root), model_control="explicit", backend="cpu", cores=1, port=0, metrics_port=None, max_peers=64))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    scorer, inference = pb_grpc.ScorerStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
    rng = np.random.default_rng(0)
    user = rng.standard_normal((1, SMALL_CONFIG.user_features)).astype(np.float32)
    peers = rng.standard_normal((8, SMALL_CONFIG.peer_features)).astype(np.float32)
    request = pb.ScoreRequest(user_features=tensor(user), peer_features=tensor(peers))
    try:
        assert scorer.Score(request).model_version == v1.model_version
        index = inference.RepositoryIndex(oip.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [("twotower", "1", "READY")]

        # clients scoring continuously through every load below
        stop, errors, seen = threading.Event(), [], [[] for _ in range(4)]

        def client(log) -> None:
            stub = pb_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
            while not stop.is_set():
                try:
                    version = stub.Score(request, timeout=10).model_version
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")
                    continue
                if not log or log[-1] != version:
                    log.append(version)

        threads = [threading.Thread(target=client, args=(log,), daemon=True) for log in seen]
        for t in threads:
            t.start()
        poll(lambda: all(seen), 10, "every client scored")

        # a corrupted version 2: refused naming the file, version 1 serves on
        shutil.copytree(v2.directory, root / "twotower" / "2")
        broken = flip_a_byte(root / "twotower" / "2")
        with pytest.raises(grpc.RpcError) as refused:
            inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="twotower"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and broken in refused.value.details()
        states = {m.version: (m.state, m.reason) for m in inference.RepositoryIndex(oip.RepositoryIndexRequest()).models}
        assert states["1"] == ("READY", "") and states["2"][0] == "UNAVAILABLE" and broken in states["2"][1]
        assert scorer.Score(request).model_version == v1.model_version
        from neuronserve.model_control import control_samples

        samples = {(x.name, x.labels): x.value for x in loop.run(_call(control_samples, server.control))}
        assert samples[("neuronserve_model_loads_total", (("outcome", "failed"),))] == 1
        assert samples[("neuronserve_model_version_served", (("version", "1"), ("current", "true")))] == 1

        # the good version 2: the switch, under load
        shutil.rmtree(root / "twotower" / "2")
        shutil.copytree(v2.directory, root / "twotower" / "2")
        inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="twotower"), timeout=30)
        poll(lambda: all(log[-1] == v2.model_version for log in seen), 10, "every client sees version 2")
        stop.set()
        for t in threads:
            t.join(10)
        assert errors == []
        assert all(log == [v1.model_version, v2.model_version] for log in seen), seen  # the version changed exactly once
        reply = inference.ModelInfer(_infer(user, peers))
        assert reply.model_version == "2"
        with pytest.raises(grpc.RpcError) as gone:  # latest:1: version 1 was drained and unloaded
            scorer.Score(pb.ScoreRequest(user_features=tensor(user), peer_features=tensor(peers), model_version="1"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

        # both versions side by side: explicit versions, and one embedding cache per version
        config = oip.ModelRepositoryParameter(string_param=json.dumps({"version_policy": {"all": {}}}))
        inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="twotower", parameters={"config": config}), timeout=30)
        by_version = {}
        for version, artifact in (("1", v1), ("2", v2)):
            reply = scorer.Score(pb.ScoreRequest(user_features=tensor(user), peer_features=tensor(peers), model_version=version))
            assert reply.model_version == artifact.model_version
            by_version[version] = scores(reply)
        assert not np.allclose(by_version["1"], by_version["2"])
        upsert = lambda kind, ids, features, version: scorer.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(  # noqa: E731
            kind=kind, ids=ids, features=tensor(features), model_version=version))
        assert upsert(pb.USER, [7], user, "2").model_version == v2.model_version
        upsert(pb.PEER, list(range(100, 108)), peers, "2")
        by_ids = pb.ScoreByIdsRequest(user_id=7, peer_ids=list(range(100, 108)))
        np.testing.assert_allclose(scores(scorer.ScoreByIds(by_ids)), by_version["2"], rtol=1e-4, atol=1e-4)
        with pytest.raises(grpc.RpcError) as missing:  # version 1's cache is its own, still empty: never version 2's rows
            scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=7, peer_ids=list(range(100, 108)), model_version="1"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        upsert(pb.USER, [7], user, "1")
        upsert(pb.PEER, list(range(100, 108)), peers, "1")
        one = scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=7, peer_ids=list(range(100, 108)), model_version="1"))
        assert one.model_version == v1.model_version
        np.testing.assert_allclose(scores(one), by_version["1"], rtol=1e-4, atol=1e-4)
        tick = scorer.ScoreTick(pb.ScoreTickRequest(user_ids=[7], peer_ids=list(range(100, 108)), k=3, model_version="1"))
        assert tick.model_version == v1.model_version

        # tritonclient: index, unload (inference UNAVAILABLE meanwhile), load with a version policy
        if importlib.util.find_spec("tritonclient") is not None:
            script = tmp_path / "triton_client.py"
            script.write_text(TRITON_SCRIPT)
            done = subprocess.run([sys.executable, str(script), f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout.strip().splitlines()[-1])
            assert report["index"] == [["twotower", "1", "READY"], ["twotower", "2", "READY"]]
            assert report["ready_after_unload"] is False and report["unknown"] == "StatusCode.NOT_FOUND"
            assert report["ready_after_load"] == [True, True, True]
            assert report["index_after"] == [["twotower", "1", "READY"], ["twotower", "2", "READY"]]
    finally:
        channel.close()
        loop.run(server.stop(5.0))
        loop.close()


def test_artifact_mode_answers_the_index_and_refuses_loads(small_artifact):
    loop = LoopThread()
    server = Server(ServerConfig(artifact=str(small_artifact.directory), backend="cpu", cores=1, port=0, metrics_port=None))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        index = inference.RepositoryIndex(oip.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [(small_artifact.model_name, "1", "READY")]
        with pytest.raises(grpc.RpcError) as refused:
            inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=small_artifact.model_name))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--model-control explicit" in refused.value.details()
    finally:
        channel.close()
        loop.run(server.stop(5.0))
        loop.close()


async def _call(fn, *args):
    return fn(*args)


def _infer(user, peers) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="twotower")
    for name, values in (("USER_FEATURES", user), ("PEER_FEATURES", peers)):
        request.inputs.add(name=name, datatype="FP32", shape=values.shape)
        request.raw_input_contents.append(np.ascontiguousarray(values, "<f4").tobytes())
    return request


def test_model_control_from_the_command_line_with_a_repository_is_accepted(tmp_path):
    """A rule across settings (--model-control explicit needs --model-repository) holds for the whole
    command line, not for each flag alone."""
    from neuronserve.cli import build_parser as cli_parser
    from neuronserve.settings import resolve_config

    args = cli_parser().parse_args(["serve", "--model-repository", str(tmp_path), "--model-control", "explicit"])
    config = resolve_config(args, environ={})
    assert (config.model_control, config.model_repository) == ("explicit", str(tmp_path))
    args = cli_parser().parse_args(["serve", "--artifact", str(tmp_path), "--model-control", "explicit"])
    with pytest.raises(ConfigError, match="--model-control: model_control explicit or poll needs a model repository"):
        resolve_config(args, environ={})


def test_poll_mode_loads_a_version_copied_into_the_repository(artifacts, tmp_path):
    """--model-control poll: a version directory that appears is verified, loaded and made current
    without any RPC."""
    v1, v2 = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    loop = LoopThread()
    config = ServerConfig(model_repository=str(root), model_control="poll", repository_poll_s=0.1, backend="cpu", cores=1, port=0, metrics_port=None, max_peers=64)
    server = Server(config)
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    scorer = pb_grpc.ScorerStub(channel)
    rng = np.random.default_rng(1)
    request = pb.ScoreRequest(
        user_features=tensor(rng.standard_normal((1, SMALL_CONFIG.user_features))),
        peer_features=tensor(rng.standard_normal((3, SMALL_CONFIG.peer_features))),
    )
    try:
        assert scorer.Score(request, timeout=10).version == 1
        shutil.copytree(v2.directory, root / "twotower" / "2")
        poll(lambda: scorer.Score(request, timeout=10).version == 2, 30, "the poll loads version 2")
        assert scorer.Score(request, timeout=10).model_version == v2.model_version
    finally:
        channel.close()
        loop.run(server.stop(5.0))
        loop.close()


def test_the_poll_tries_a_refused_version_once_until_its_artifact_changes(artifacts, tmp_path, monkeypatch):
    """A corrupted version is not loaded again on every poll (on Inf1 each try is minutes of load): once
    refused, the poll skips it until its manifest.json is replaced, then loads it."""
    v1, v2 = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    loop = LoopThread()
    server = Server(ServerConfig(model_repository=str(root), model_control="poll", repository_poll_s=0.02, backend="cpu", cores=1, port=0, metrics_port=None, max_peers=64))
    loop.run(server.start())
    control = server.control
    scans, scan = [], type(control.repository).scan
    monkeypatch.setattr(type(control.repository), "scan", lambda *args: scans.append(1) or scan(*args))
    try:
        shutil.copytree(v2.directory, root / "twotower" / "2")
        flip_a_byte(root / "twotower" / "2")
        poll(lambda: control.counts.failed == 1, 30, "the poll refuses the corrupted version 2")
        seen = len(scans)
        poll(lambda: len(scans) >= seen + 10, 30, "ten more polls")
        assert control.counts.failed == 1 and server.versions.versions == (1,)  # not tried again
        shutil.copytree(v2.directory, tmp_path / "fixed")
        shutil.rmtree(root / "twotower" / "2")
        (tmp_path / "fixed").rename(root / "twotower" / "2")  # a new artifact: a new manifest.json
        poll(lambda: 2 in server.versions.versions, 30, "the poll loads the replaced version 2")
        assert control.counts.failed == 1
    finally:
        loop.run(server.stop(5.0))
        loop.close()


# ---- lifecycle edges: a stop during a load, readiness with no version loaded ---------------------


class _PausedLoad:
    """version_build's `time` for a test: the first pace of a version's load (after its first stage is
    loaded and warm) waits for `release`, and `reached` says the load got there."""

    def __init__(self) -> None:
        self.reached, self.release = threading.Event(), threading.Event()

    def sleep(self, seconds: float) -> None:
        if not self.reached.is_set():
            self.reached.set()
            assert self.release.wait(30), "the test never released the load"


async def _stop_then_look(server: Server):
    await server.stop(5.0)
    return {r.version: (r.state, r.reason) for r in server.control.index()}, server.control.counts


def _repository_server(root: Path, mode: str) -> Server:
    return Server(ServerConfig(model_repository=str(root), model_control=mode, repository_poll_s=0.05, backend="cpu", cores=1, port=0, metrics_port=None, max_peers=64))


@pytest.mark.parametrize("mode", ["explicit", "poll"])
def test_a_stop_during_a_load_abandons_it_at_its_next_stage(artifacts, tmp_path, monkeypatch, caplog, mode):
    """A SIGTERM while a version loads (audit D2): stop() makes the load give up at its next stage and
    waits for it (no loading thread outlives the server); the load is logged at INFO as abandoned, not
    counted as failed, and an RPC's caller gets UNAVAILABLE saying so."""
    from neuronserve import version_build

    v1, v2 = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    paused = _PausedLoad()
    monkeypatch.setattr(version_build, "time", paused)
    caplog.set_level(logging.INFO)
    loop = LoopThread()
    server = _repository_server(root, mode)
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    answers: list = []

    def load() -> None:
        try:
            oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="twotower"), timeout=30)
            answers.append("OK")
        except grpc.RpcError as exc:
            answers.append((exc.code(), exc.details()))

    caller = threading.Thread(target=load, daemon=True)
    try:
        shutil.copytree(v2.directory, tmp_path / "staging")
        (tmp_path / "staging").rename(root / "twotower" / "2")  # whole at once: the poll never sees half of it
        if mode == "explicit":
            caller.start()
        assert paused.reached.wait(30), "version 2's load did not reach its first stage"
        stopping = asyncio.run_coroutine_threadsafe(_stop_then_look(server), loop.loop)
        wait_until(lambda: loop.call(lambda: server.state.draining))  # stop() began
        paused.release.set()
        index, counts = stopping.result(30)
    finally:
        paused.release.set()
        channel.close()
        loop.close()
    assert index[2] == ("UNAVAILABLE", "load abandoned: shutting down")  # settled before stop() returned
    assert (counts.loaded, counts.failed) == (0, 0)
    model_control = [r for r in caplog.records if r.name == "neuronserve.model_control"]
    assert any(r.levelno == logging.INFO and "version 2 abandoned: the server is shutting down" in r.getMessage() for r in model_control)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("neuronserve")] == []
    if mode == "explicit":
        caller.join(10)
        assert len(answers) == 1 and answers[0][0] == grpc.StatusCode.UNAVAILABLE, answers
        assert "shutting down: the load of model twotower version 2 was abandoned" in answers[0][1]


def test_readiness_follows_the_versions_loaded(artifacts, tmp_path):
    """With no version loaded (RepositoryModelUnload of the model, audit D4) every inference call gets
    UNAVAILABLE, so readiness says so: health "", the Scorer and the OIP service NOT_SERVING, ServerReady
    false; liveness (grpc.health.v1.Health, ServerLive) stays up. A load makes them SERVING again."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    v1, _ = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    loop = LoopThread()
    server = _repository_server(root, "explicit")
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health, inference = health_pb2_grpc.HealthStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
    names = ("", "neuronserve.v1.Scorer", "inference.GRPCInferenceService", "grpc.health.v1.Health")
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def readiness() -> tuple:
        statuses = tuple(health.Check(health_pb2.HealthCheckRequest(service=n), timeout=10).status for n in names)
        return statuses, inference.ServerReady(oip.ServerReadyRequest()).ready, inference.ServerLive(oip.ServerLiveRequest()).live

    try:
        assert readiness() == ((serving,) * 4, True, True)
        inference.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="twotower"), timeout=30)
        assert readiness() == ((not_serving, not_serving, not_serving, serving), False, True)
        user = np.zeros((1, SMALL_CONFIG.user_features), np.float32)
        with pytest.raises(grpc.RpcError) as refused:
            inference.ModelInfer(_infer(user, np.zeros((2, SMALL_CONFIG.peer_features), np.float32)), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name="twotower"), timeout=30)
        assert readiness() == ((serving,) * 4, True, True)
    finally:
        channel.close()
        loop.run(server.stop(5.0))
        loop.close()
