"""The model repository RPCs behind the admin token (admin_auth.py): refused without it, with a wrong
one, answered with it; the inference RPCs never need it; model control on a non-loopback address
needs a token or mTLS to start."""

from __future__ import annotations

import grpc
import pytest

from neuronserve.admin_auth import load_token
from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.server import Server
from support import LoopThread

pytestmark = pytest.mark.timeout(60)
TOKEN = "s3cret-admin-token-0123456789"


@pytest.mark.parametrize("host, extra, ok", [
    ("0.0.0.0", {}, False),
    ("10.1.2.3", {}, False),
    ("0.0.0.0", {"admin_token_file": "/run/secrets/token"}, True),
    ("0.0.0.0", {"tls_client_ca": "ca.pem", "tls_cert": "c.pem", "tls_key": "k.pem"}, True),
    ("127.0.0.1", {}, True),
    ("localhost", {}, True),
])
def test_model_control_off_loopback_needs_a_token_or_mtls(host, extra, ok):
    make = lambda: ServerConfig(model_repository="r", model_control="explicit", host=host, **extra)  # noqa: E731
    if ok:
        make()
    else:
        with pytest.raises(ConfigError, match="admin-token-file"):
            make()
    ServerConfig(host=host)  # without model control nothing is asked


def test_a_token_file_must_hold_one_long_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(str(tmp_path / "missing"))
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_token(str(short))
    good = tmp_path / "good"
    good.write_text(f"  {TOKEN}\n")
    assert load_token(str(good)) == TOKEN.encode()


@pytest.fixture(scope="module")
def guarded(small_artifact, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("admin") / "token"
    token_file.write_text(TOKEN + "\n")
    loop = LoopThread()
    server = Server(ServerConfig(artifact=str(small_artifact.directory), backend="cpu", cores=1, port=0, metrics_port=None,
                                 admin_token_file=str(token_file)))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield oip_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
    loop.run(server.stop(grace_period_s=1.0))
    loop.close()


@pytest.mark.parametrize("metadata", [None, [("authorization", "Bearer wrong-token-0123456789")], [("authorization", TOKEN)]])
def test_repository_rpcs_without_the_token_are_unauthenticated(guarded, metadata):
    calls = [(guarded.RepositoryIndex, oip.RepositoryIndexRequest()),
             (guarded.RepositoryModelLoad, oip.RepositoryModelLoadRequest(model_name="twotower")),
             (guarded.RepositoryModelUnload, oip.RepositoryModelUnloadRequest(model_name="twotower"))]
    for method, request in calls:
        with pytest.raises(grpc.RpcError) as info:
            method(request, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        assert "authorization: Bearer" in info.value.details()


def test_the_token_opens_the_repository_rpcs_and_inference_never_needs_it(guarded):
    index = guarded.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=[("authorization", f"Bearer {TOKEN}")])
    assert [m.state for m in index.models] == ["READY"]
    assert guarded.ServerLive(oip.ServerLiveRequest()).live
    assert guarded.ModelReady(oip.ModelReadyRequest(name="twotower")).ready
