"""The Open Inference Protocol against a real external client: Triton's Python client (tritonclient.grpc).

tritonclient's generated code defines protobuf package `inference`, as neuronserve.protos.open_inference_pb2
does, and protobuf refuses both in one process; so the client runs in a subprocess (the script below)
against a server in this process, and the scores it gets are compared here with the scorer API's Score
for the same inputs."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from neuronserve.config import ServerConfig
from neuronserve.metrics import Metrics
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server
from neuronserve.version_build import model_info
from neuronserve.oip_service import model_statistics
from neuronserve.service import oip_version_of

pytestmark = [
    pytest.mark.timeout(90),
    # find_spec, not importorskip: importing tritonclient here would clash with open_inference_pb2
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] is a test extra"),
]

CLIENT_SCRIPT = r'''
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

url, inputs_path, outputs_path, artifact_version = sys.argv[1:5]
client = tc.InferenceServerClient(url=url)
report = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("twotower"),
    "unknown_model_ready": client.is_model_ready("nope"),
    "server_name": client.get_server_metadata().name,
    # the OIP version "1", the artifact's version (accepted too) and one it does not serve
    "version_ready": [client.is_model_ready("twotower", v) for v in ("1", artifact_version, "2")],
}
meta = client.get_model_metadata("twotower")
report["metadata"] = {
    "name": meta.name,
    "versions": list(meta.versions),
    "platform": meta.platform,
    "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
    "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs],
}
data = np.load(inputs_path)
user, peers = data["user"], data["peers"]
inputs = [tc.InferInput("USER_FEATURES", list(user.shape), "FP32"), tc.InferInput("PEER_FEATURES", list(peers.shape), "FP32")]
inputs[0].set_data_from_numpy(user)
inputs[1].set_data_from_numpy(peers)
result = client.infer("twotower", inputs, outputs=[tc.InferRequestedOutput("SCORES")], request_id="triton-1")
response = result.get_response()
report["response"] = {"model_name": response.model_name, "model_version": response.model_version, "id": response.id}
scores = result.as_numpy("SCORES")
report["scores_by_version"] = [
    client.infer("twotower", inputs, model_version=v).as_numpy("SCORES").tolist() == scores.tolist() for v in ("1", artifact_version)
]
features = tc.InferInput("FEATURES", list(peers.shape), "FP32")
features.set_data_from_numpy(peers)
embeddings = client.infer("peer_tower", [features]).as_numpy("EMBEDDINGS")
for case, model, case_inputs in (
    ("unknown_model", "threetower", inputs),
    ("bad_datatype", "twotower", [inputs[0], tc.InferInput("PEER_FEATURES", list(peers.shape), "FP64")]),
):
    if case == "bad_datatype":
        case_inputs[1].set_data_from_numpy(peers.astype(np.float64))
    try:
        client.infer(model, case_inputs)
        report[case] = None
    except InferenceServerException as exc:
        report[case] = [str(exc.status()), exc.message()]
for case, call in (
    ("wrong_version_infer", lambda: client.infer("twotower", inputs, model_version="2")),
    ("wrong_version_metadata", lambda: client.get_model_metadata("twotower", "2")),
    ("hex_version_statistics", lambda: client.get_inference_statistics("twotower", "e964ad470244")),
):
    try:
        call()
        report[case] = None
    except InferenceServerException as exc:
        report[case] = [str(exc.status()), exc.message()]
# what perf_analyzer asks before and during a run: the model configuration and the statistics
report["config"] = client.get_model_config("twotower", as_json=True)["config"]
report["config_by_version"] = [client.get_model_config("twotower", v, as_json=True)["config"] == report["config"] for v in ("1", artifact_version)]
report["statistics"] = client.get_inference_statistics(as_json=True)["model_stats"]
try:
    client.get_inference_statistics("threetower")
    report["unknown_statistics"] = None
except InferenceServerException as exc:
    report["unknown_statistics"] = [str(exc.status()), exc.message()]
np.savez(outputs_path, scores=scores, embeddings=embeddings)
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def server(small_artifact):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = Server(ServerConfig(artifact=str(small_artifact.directory), backend="cpu", cores=1, port=0, metrics_port=None))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    yield server
    asyncio.run_coroutine_threadsafe(server.stop(5.0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_tritonclient_metadata_and_infer_match_the_scorer_api(server, small_artifact, tmp_path):
    cfg = small_artifact.model_config
    rng = np.random.default_rng(3)
    user = rng.standard_normal((1, cfg.user_features)).astype(np.float32)
    peers = rng.standard_normal((23, cfg.peer_features)).astype(np.float32)
    script, inputs_path, outputs_path = tmp_path / "client.py", tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    script.write_text(CLIENT_SCRIPT)
    np.savez(inputs_path, user=user, peers=peers)
    done = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{server.port}", str(inputs_path), str(outputs_path), small_artifact.model_version],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert (report["live"], report["ready"], report["model_ready"], report["unknown_model_ready"]) == (True, True, True, False)
    assert report["server_name"] == "neuronserve"
    assert report["version_ready"] == [True, True, False]
    # versions are integers over the OIP (perf_analyzer parses them); the artifact's stays in the platform
    assert report["metadata"] == {
        "name": "twotower",
        "versions": ["1"],
        "platform": f"neuronserve_cpu@{small_artifact.model_version}",
        "inputs": [["USER_FEATURES", "FP32", [1, cfg.user_features]], ["PEER_FEATURES", "FP32", [-1, cfg.peer_features]]],
        "outputs": [["SCORES", "FP32", [-1, cfg.num_labels]]],
    }
    assert report["response"] == {"model_name": "twotower", "model_version": "1", "id": "triton-1"}
    assert report["scores_by_version"] == [True, True]
    assert report["config_by_version"] == [True, True]
    for case in ("wrong_version_infer", "wrong_version_metadata", "hex_version_statistics"):
        assert report[case][0] == "StatusCode.NOT_FOUND" and "'1'" in report[case][1], case
    assert report["unknown_model"][0] == "StatusCode.NOT_FOUND" and "threetower" in report["unknown_model"][1]
    assert report["bad_datatype"][0] == "StatusCode.INVALID_ARGUMENT" and "FP64" in report["bad_datatype"][1]

    # Triton's ModelConfig and ModelStatistics, decoded by Triton's own generated code (int64 as strings in JSON)
    config = report["config"]
    assert (config["name"], config["backend"], config.get("max_batch_size", 0)) == ("twotower", "neuronserve", 0)
    assert config["platform"] == f"neuronserve_cpu@{small_artifact.model_version}"
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("USER_FEATURES", "TYPE_FP32", ["1", str(cfg.user_features)]),
        ("PEER_FEATURES", "TYPE_FP32", ["-1", str(cfg.peer_features)]),
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("SCORES", "TYPE_FP32", ["-1", str(cfg.num_labels)])]
    stats = {m["name"]: m for m in report["statistics"]}
    assert sorted(stats) == ["peer_tower", "twotower", "user_tower"]
    twotower = stats["twotower"]
    infer = twotower["inference_stats"]
    # Triton's semantics for a max_batch_size 0 model: one inference per request (not per row); queue
    # and the three compute phases counted once per successful request, so perf_analyzer finds them equal
    assert {m["version"] for m in report["statistics"]} == {"1"}
    assert int(infer["success"]["count"]) == 3 and int(infer["success"]["ns"]) > 0  # the three infers above
    assert int(infer["fail"]["count"]) == 2  # the FP64 request, version "2"
    counts = {phase: int(infer[phase].get("count", 0)) for phase in ("queue", "compute_input", "compute_infer", "compute_output")}
    assert counts == dict.fromkeys(counts, 3)
    assert int(infer["compute_infer"]["ns"]) > 0 and int(infer["queue"].get("ns", 0)) >= 0
    # 23 peers are above the largest bucket (16): each request runs in one or two batch executions
    assert int(twotower["inference_count"]) == 3 and 3 <= int(twotower["execution_count"]) <= 6
    assert int(twotower["last_inference"]) > 0
    assert int(stats["peer_tower"]["inference_count"]) == 1  # the peer_tower infer: 23 rows, one request
    assert report["unknown_statistics"][0] == "StatusCode.NOT_FOUND" and "threetower" in report["unknown_statistics"][1]

    with np.load(outputs_path) as outputs:
        triton_scores, triton_embeddings = outputs["scores"], outputs["embeddings"]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = pb_grpc.ScorerStub(channel).Score(
            pb.ScoreRequest(
                user_features=pb.Tensor(data=user.tobytes(), shape=user.shape),
                peer_features=pb.Tensor(data=peers.tobytes(), shape=peers.shape),
            ),
            timeout=10,
        )
        request = oip.ModelInferRequest(model_name="peer_tower", raw_input_contents=[peers.tobytes()])
        request.inputs.add(name="FEATURES", datatype="FP32", shape=peers.shape)
        tower = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    scores = np.frombuffer(reply.scores.data, "<f4").reshape(tuple(reply.scores.shape))
    assert triton_scores.shape == (23, cfg.num_labels) and triton_scores.dtype == np.float32
    np.testing.assert_array_equal(triton_scores, scores)
    assert triton_embeddings.shape == (23, cfg.num_labels, cfg.label_dim)
    np.testing.assert_array_equal(triton_embeddings, np.frombuffer(tower.raw_output_contents[0], "<f4").reshape(triton_embeddings.shape))


@pytest.mark.parametrize(
    "artifact_version, served",
    [("7", "7"), ("007", "7"), ("9223372036854775807", "9223372036854775807"), ("9223372036854775808", "1"), ("0", "1"),
     ("e964ad470244", "1"), ("2024-06-01", "1"), ("", "1"), ("\u0663", "1")],
)
def test_the_oip_serves_an_integer_version(small_artifact, artifact_version, served):
    """perf_analyzer parses versions with std::stoll: a named integer version is served as it is,
    anything else (a content hash, a date) as 1; the artifact's version stays in the platform string."""
    assert oip_version_of(artifact_version) == served
    info = model_info(dataclasses.replace(small_artifact, model_version=artifact_version), ServerConfig(), "sim")
    assert (info.version, info.oip_version, info.oip_platform) == (artifact_version, served, f"neuronserve_sim@{artifact_version}")


def test_statistics_count_requests_and_charge_each_its_batch_times():
    """Triton's ModelStatistics for a max_batch_size 0 model: success, queue and the three compute
    phases share one count (successful requests), inference_count counts requests, execution_count
    batches; a batch's input, infer and output times are charged to every request in it."""
    metrics = Metrics(version="e964ad470244", batch_buckets=(1, 8))
    metrics.execution("twotower", rows=12, requests=2, compute_s=0.010, input_s=0.001, output_s=0.002)
    metrics.execution("twotower", rows=5, requests=1, compute_s=0.004)
    for status, seconds in (("OK", 0.02), ("OK", 0.03), ("OK", 0.01), ("INVALID_ARGUMENT", 0.001)):
        metrics.request("twotower", status, seconds)
    proto = model_statistics(metrics.statistics("twotower"), "1")
    infer = proto.inference_stats
    assert (proto.name, proto.version, proto.inference_count, proto.execution_count) == ("twotower", "1", 3, 2)
    assert [d.count for d in (infer.success, infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output)] == [3] * 5
    assert (infer.fail.count, infer.fail.ns) == (1, 1_000_000)
    assert infer.success.ns == pytest.approx(60_000_000, abs=2)
    assert infer.compute_infer.ns == pytest.approx(24_000_000, abs=2)  # 10 ms x 2 requests + 4 ms x 1
    assert (infer.compute_input.ns, infer.compute_output.ns) == (pytest.approx(2_000_000, abs=2), pytest.approx(4_000_000, abs=2))
    assert proto.last_inference > 0
    text = metrics.render()  # Prometheus keeps rows as nv_inference_count, beside the Triton-named phases
    assert 'nv_inference_count{model="twotower",version="e964ad470244"} 17' in text
    assert 'nv_inference_compute_output_duration_us{model="twotower",version="e964ad470244"} 4000' in text
    assert model_statistics(metrics.statistics("peer_tower"), "1").inference_stats.compute_infer.count == 0  # unseen: zeros
