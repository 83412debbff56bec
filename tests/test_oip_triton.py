"""The Open Inference Protocol against a real external client: Triton's Python client (tritonclient.grpc).

tritonclient's generated code defines protobuf package `inference`, as neuronserve.protos.open_inference_pb2
does, and protobuf refuses both in one process; so the client runs in a subprocess (the script below)
against a server in this process, and the scores it gets are compared here with the scorer API's Score
for the same inputs."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest

from neuronserve.config import ServerConfig
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server

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

url, inputs_path, outputs_path = sys.argv[1:4]
client = tc.InferenceServerClient(url=url)
report = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": client.is_model_ready("twotower"),
    "unknown_model_ready": client.is_model_ready("nope"),
    "server_name": client.get_server_metadata().name,
}
meta = client.get_model_metadata("twotower")
report["metadata"] = {
    "name": meta.name,
    "versions": list(meta.versions),
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
# what perf_analyzer asks before and during a run: the model configuration and the statistics
report["config"] = client.get_model_config("twotower", as_json=True)["config"]
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
        [sys.executable, str(script), f"127.0.0.1:{server.port}", str(inputs_path), str(outputs_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert (report["live"], report["ready"], report["model_ready"], report["unknown_model_ready"]) == (True, True, True, False)
    assert report["server_name"] == "neuronserve"
    assert report["metadata"] == {
        "name": "twotower",
        "versions": [small_artifact.model_version],
        "inputs": [["USER_FEATURES", "FP32", [1, cfg.user_features]], ["PEER_FEATURES", "FP32", [-1, cfg.peer_features]]],
        "outputs": [["SCORES", "FP32", [-1, cfg.num_labels]]],
    }
    assert report["response"] == {"model_name": "twotower", "model_version": small_artifact.model_version, "id": "triton-1"}
    assert report["unknown_model"][0] == "StatusCode.NOT_FOUND" and "threetower" in report["unknown_model"][1]
    assert report["bad_datatype"][0] == "StatusCode.INVALID_ARGUMENT" and "FP64" in report["bad_datatype"][1]

    # Triton's ModelConfig and ModelStatistics, decoded by Triton's own generated code (int64 as strings in JSON)
    config = report["config"]
    assert (config["name"], config["backend"], config.get("max_batch_size", 0)) == ("twotower", "neuronserve", 0)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("USER_FEATURES", "TYPE_FP32", ["1", str(cfg.user_features)]),
        ("PEER_FEATURES", "TYPE_FP32", ["-1", str(cfg.peer_features)]),
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("SCORES", "TYPE_FP32", ["-1", str(cfg.num_labels)])]
    stats = {m["name"]: m for m in report["statistics"]}
    assert sorted(stats) == ["peer_tower", "twotower", "user_tower"]
    twotower = stats["twotower"]
    infer = twotower["inference_stats"]
    assert twotower["version"] == small_artifact.model_version
    assert int(infer["success"]["count"]) >= 1 and int(infer["success"]["ns"]) > 0  # the infer above
    assert int(infer["fail"]["count"]) >= 1  # the FP64 request
    assert int(infer["queue"]["count"]) >= 1 and int(infer["compute_infer"]["count"]) >= 1
    assert int(twotower["inference_count"]) >= 23 and int(twotower["execution_count"]) >= 1
    assert int(twotower["last_inference"]) > 0
    assert int(stats["peer_tower"]["inference_count"]) >= 23  # the peer_tower infer
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
