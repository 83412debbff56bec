"""Experiments routing live requests (issue 15, items 3 and 4): `serve --experiment SPEC` between two
versions of a model repository. Real servers on loopback with real gRPC clients (and /metrics over
HTTP); the switch-back runs on a fake clock injected where the server is built (no sleeps). Replies name
the integer version and the arm; the assignment matches experiments.py and its CLI for every user and
time; an explicit version wins; neuronserve_requests_total carries version and arm labels."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest

from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError, NotFound
from neuronserve.experiments import ABTest, Experiment, SwitchBack, design_from_spec
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server
from neuronserve.versions import ROUTED, ServedVersion, VersionTable

from support import LoopThread, wait_until
from tests.conftest import SMALL_BUCKETS, SMALL_CONFIG

pytestmark = pytest.mark.timeout(120)

USERS = list(range(40))
PEERS = list(range(1000, 1008))


class FakeClock:
    """What the server's experiment reads as now (seconds); moved by the test only."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- routing in the version table, no server -------------------------------------------------------


class _Info:
    def __init__(self, version: str) -> None:
        self.version = version


def _served(version: int) -> ServedVersion:
    return ServedVersion(version, _Info(f"hash{version}"), runtime=object(), cache=object())


def test_route_order_explicit_then_experiment_then_default(caplog):
    table = VersionTable(_served(2), Experiment(ABTest(control=1, candidate=2, share=0.5)))
    users = {ABTest(1, 2, 0.5).assign(u).arm: u for u in range(50)}
    control_user, candidate_user = users["control"], users["candidate"]
    with caplog.at_level(logging.WARNING, logger="neuronserve.versions"):
        for _ in range(3):  # version 1 not loaded yet: its users get the default, logged once
            route = table.route("", control_user)
            assert (route.version, route.arm) == (2, "default") and ROUTED.get() is route
    assert sum("version 1 is not served" in r.getMessage() for r in caplog.records) == 1
    table.install(_served(1))
    assert (table.route("", control_user).version, table.route("", control_user).arm) == (1, "control")
    assert (table.route("", candidate_user).version, table.route("", candidate_user).arm) == (2, "candidate")
    assert (table.route("1", candidate_user).version, table.route("1", candidate_user).arm) == (1, "explicit")
    assert table.route("hash2", control_user).arm == "explicit"  # the artifact's version names it too
    assert (table.route("", None).version, table.route("", None).arm) == (2, "default")  # no user: outside the A/B
    assert table.route("", control_user, experiment=False).arm == "default"
    with pytest.raises(NotFound):
        table.route("3", control_user)


def test_switch_back_route_before_the_start_is_the_default():
    clock = FakeClock(100.0)
    table = VersionTable(_served(1), Experiment(SwitchBack(1, 2, seed=3, window_s=10.0, start_s=500.0), clock))
    table.install(_served(2))
    assert table.route("").arm == "default"
    clock.t = 500.0
    assert table.route("").arm in ("control", "candidate")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"design": "abc", "control": 1, "candidate": 2}, "'design'"),
        ({"design": "ab", "control": 1, "candidate": 1}, "both version 1"),
        ({"design": "ab", "control": 0, "candidate": 2}, "'control'"),
        ({"design": "ab", "control": 1, "candidate": 2, "share": 1.5}, "share"),
        ({"design": "ab", "control": 1, "candidate": 2, "shares": 0.5}, "unknown keys"),
        ({"design": "switchback", "control": 1, "candidate": 2, "window_s": 0}, "window_s"),
        ({"design": "switchback", "control": 1, "candidate": 2, "seed": "7"}, "'seed'"),
    ],
)
def test_a_bad_spec_is_a_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        design_from_spec(spec, "spec.json")


def test_an_experiment_needs_a_repository():
    with pytest.raises(ConfigError, match="model repository"):
        ServerConfig(artifact="x", experiment="spec.json")


# ---- real servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(small_artifact, tmp_path_factory):
    """DIR/twotower/1 (the session's small artifact) and /2 (the same model compiled with seed 8)."""
    from neuronserve.compile import compile_artifact

    root = tmp_path_factory.mktemp("experiment-repo")
    second = compile_artifact(
        tmp_path_factory.mktemp("v2") / "artifact", config=SMALL_CONFIG, batch_sizes=SMALL_BUCKETS, seed=8
    )
    shutil.copytree(small_artifact.directory, root / "twotower" / "1")
    shutil.copytree(second.directory, root / "twotower" / "2")
    return root


def tensor(array) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=array.tobytes(), shape=array.shape)


def scores(reply) -> np.ndarray:
    return np.frombuffer(reply.scores.data, "<f4").reshape(tuple(reply.scores.shape))


def infer(user, peers, version: str = "", user_id: int | None = None) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="twotower", model_version=version)
    for name, values in (("USER_FEATURES", user), ("PEER_FEATURES", peers)):
        request.inputs.add(name=name, datatype="FP32", shape=values.shape)
        request.raw_input_contents.append(np.ascontiguousarray(values, "<f4").tobytes())
    if user_id is not None:
        request.parameters["user_id"].int64_param = user_id
    return request


@contextlib.contextmanager
def serving(repository, tmp_path, spec: dict, clock):
    """A server of versions 1 and 2 with the experiment `spec`, both versions loaded; yields (server,
    scorer stub, inference stub, features by id, spec path)."""
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(spec))
    config = ServerConfig(
        model_repository=str(repository),
        version_policy="specific:1,2",
        experiment=str(path),
        backend="cpu",
        cores=1,
        port=0,
        metrics_port=0,
        max_peers=64,
    )
    loop = LoopThread()
    server = Server(config, clock=clock)
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        wait_until(lambda: loop.call(lambda: server.versions.versions) == (1, 2), 60)  # version 1 loads after start
        scorer, inference = pb_grpc.ScorerStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        rng = np.random.default_rng(0)
        features = {i: rng.standard_normal(SMALL_CONFIG.user_features).astype(np.float32) for i in USERS + PEERS}
        for version in ("1", "2"):  # each version has its own cache: upsert to each by name
            for kind, ids in ((pb.USER, USERS + PEERS), (pb.PEER, USERS + PEERS)):
                rows = np.stack([features[i] for i in ids])
                scorer.UpsertEmbeddings(
                    pb.UpsertEmbeddingsRequest(kind=kind, ids=ids, features=tensor(rows), model_version=version)
                )
        yield server, scorer, inference, features, path
    finally:
        channel.close()
        loop.run(server.stop(5.0))
        loop.close()


def requests_total(server) -> dict[tuple[str, str, str, str], float]:
    """neuronserve_requests_total from /metrics over HTTP: (model, version, arm, status) -> count."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        page = response.read().decode()
    out = {}
    for labels, value in re.findall(r"^neuronserve_requests_total\{([^}]*)\} (\S+)$", page, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(got["model"], got["version"], got["arm"], got["status"])] = float(value)
    return out


def cli_assign(*args: str) -> dict:
    from neuronserve.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["experiment", "assign", *args]) == 0
    return json.loads(out.getvalue())


def test_ab_sends_each_user_consistently_to_its_arm(repository, tmp_path):
    spec = {"design": "ab", "control": 1, "candidate": 2, "share": 0.5, "salt": "exp-15"}
    design = ABTest(1, 2, 0.5, "exp-15")
    with serving(repository, tmp_path, spec, FakeClock(0.0)) as (server, scorer, inference, features, path):
        peers = np.stack([features[i] for i in PEERS])
        sent: Counter = Counter()
        arms = set()
        for user in USERS:
            want = design.assign(user)
            assert cli_assign("--spec", str(path), "--user", str(user), "--time", "0")["arm"] == want.arm
            user_row = features[user][None, :]
            for _ in range(2):  # the same user, the same arm, every time and on every RPC
                reply = scorer.Score(pb.ScoreRequest(user_features=tensor(user_row), peer_features=tensor(peers), user_id=user))
                by_ids = scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=user, peer_ids=PEERS))
                oip_reply = inference.ModelInfer(infer(user_row, peers, user_id=user))
                assert (reply.version, reply.arm) == (want.version, want.arm)
                assert (by_ids.version, by_ids.arm) == (want.version, want.arm)
                assert (oip_reply.model_version, oip_reply.parameters["arm"].string_param) == (str(want.version), want.arm)
                sent[("twotower", str(want.version), want.arm)] += 2
                sent[("twotower_cached", str(want.version), want.arm)] += 1
            named = scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=user, peer_ids=PEERS, model_version=str(want.version)))
            np.testing.assert_allclose(scores(by_ids), scores(named))  # the assigned version's own cache
            sent[("twotower_cached", str(want.version), "explicit")] += 1
            arms.add(want.arm)
        assert arms == {"control", "candidate"}

        # an explicit version wins over the assignment, on both protocols
        candidate = next(u for u in USERS if design.assign(u).arm == "candidate")
        user_row = features[candidate][None, :]
        named = scorer.Score(
            pb.ScoreRequest(user_features=tensor(user_row), peer_features=tensor(peers), user_id=candidate, model_version="1")
        )
        assert (named.version, named.arm) == (1, "explicit")
        named_oip = inference.ModelInfer(infer(user_row, peers, version="1", user_id=candidate))
        assert (named_oip.model_version, named_oip.parameters["arm"].string_param) == ("1", "explicit")
        sent[("twotower", "1", "explicit")] += 2

        # outside the A/B (no user id, several users): the default version, arm default
        no_user = scorer.Score(pb.ScoreRequest(user_features=tensor(user_row), peer_features=tensor(peers)))
        tick = scorer.ScoreTick(pb.ScoreTickRequest(pool_ids=USERS[:6], k=2))
        matrix = scorer.ScoreMatrix(pb.ScoreMatrixRequest(user_ids=USERS[:3], peer_ids=PEERS))
        assert {(r.version, r.arm) for r in (no_user, tick, matrix)} == {(2, "default")}
        sent[("twotower", "2", "default")] += 1
        sent[("twotower_cached", "2", "default")] += 2

        with pytest.raises(grpc.RpcError) as bad:
            inference.ModelInfer(_with_string_user(infer(user_row, peers), "seven"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_id" in bad.value.details()

        metrics = requests_total(server)
        for (model, version, arm), count in sent.items():
            assert metrics[(model, version, arm, "OK")] == count, (model, version, arm)
        assert {arm for (_, _, arm, _) in metrics} <= {"default", "control", "candidate", "explicit"}
        assert {version for (_, version, _, _) in metrics} == {"1", "2"}
        first, second = sorted(server.versions.all(), key=lambda v: v.version)
        # one model's second version: the first's bucket costs reused, not timed again beside the traffic
        assert all(second.pipeline.plans[stage] is plan for stage, plan in first.pipeline.plans.items())


def _with_string_user(request: oip.ModelInferRequest, text: str) -> oip.ModelInferRequest:
    request.parameters["user_id"].string_param = text
    return request


def test_switch_back_switches_version_at_window_boundaries_on_a_fake_clock(repository, tmp_path):
    start, window_s, burn_in_s = 10_000.0, 600.0, 60.0
    spec = {"design": "switchback", "control": 1, "candidate": 2, "seed": 5, "window_s": window_s, "burn_in_s": burn_in_s, "start": start}
    design = SwitchBack(1, 2, seed=5, window_s=window_s, burn_in_s=burn_in_s, start_s=start)
    windows = design.schedule(start + 8 * window_s)
    assert {w.arm for w in windows} == {"control", "candidate"}  # the seed gives both arms, and switches
    clock = FakeClock(start - 1.0)
    with serving(repository, tmp_path, spec, clock) as (server, scorer, inference, features, path):
        peers = np.stack([features[i] for i in PEERS])
        user_row = features[USERS[0]][None, :]

        def served() -> set[tuple[int, str, bool]]:
            """(version, arm, burn-in) of one request per RPC at the clock's time: they must agree."""
            replies = [
                scorer.Score(pb.ScoreRequest(user_features=tensor(user_row), peer_features=tensor(peers), user_id=7)),
                scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=USERS[1], peer_ids=PEERS)),
                scorer.ScoreMatrix(pb.ScoreMatrixRequest(user_ids=USERS[:3], peer_ids=PEERS)),
                scorer.ScoreTick(pb.ScoreTickRequest(pool_ids=USERS[:6], k=2)),
            ]
            oip_reply = inference.ModelInfer(infer(user_row, peers))
            return {(r.version, r.arm, r.burn_in) for r in replies} | {
                (
                    int(oip_reply.model_version),
                    oip_reply.parameters["arm"].string_param or "default",
                    oip_reply.parameters["burn_in"].bool_param,  # absent: False
                )
            }

        assert served() == {(2, "default", False)}  # before the start: the current version
        seen, burn_ins = [], []
        for window in windows:
            for t in (window.start_s, window.start_s + burn_in_s / 2, window.end_s - 0.001):
                clock.t = t
                want = design.assign(t)
                assert served() == {(want.version, want.arm, want.burn_in)}, (window, t)
                burn_ins.append(want.burn_in)
                got = cli_assign("--spec", str(path), "--user", "7", "--time", repr(t))
                assert (got["arm"], got["version"], got["window"]) == (want.arm, want.version, window.index)
                seen.append(want.version)
        # the version changes exactly at the boundaries where the schedule switches arm
        switches = sum(a != b for a, b in zip(seen, seen[1:]))
        assert switches == sum(a.arm != b.arm for a, b in zip(windows, windows[1:])) > 0
        assert True in burn_ins and False in burn_ins  # the replies flagged the burn-in after a switch, and only it

        # an explicit version wins in every window
        named = scorer.ScoreTick(pb.ScoreTickRequest(pool_ids=USERS[:6], k=2, model_version="1"))
        assert (named.version, named.arm) == (1, "explicit")
        metrics = requests_total(server)
        assert metrics[("twotower_cached", "1", "explicit", "OK")] == 1
        assert {arm for (_, _, arm, _) in metrics} == {"default", "control", "candidate", "explicit"}


def test_an_experiment_on_a_version_the_policy_does_not_serve_is_refused(repository, tmp_path):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({"design": "ab", "control": 1, "candidate": 2, "share": 0.1}))
    config = ServerConfig(model_repository=str(repository), experiment=str(path), backend="cpu", cores=1, port=0, metrics_port=None)
    loop = LoopThread()
    try:
        with pytest.raises(ConfigError, match=r"version \[1\] is not served.*specific"):
            loop.run(Server(config).start())
    finally:
        loop.close()
