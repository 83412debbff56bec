"""The matching tick: neuronserve.tick against the plain numpy reference (the whole matrix, combined,
sorted), then ScoreTick end to end through a real in-process gRPC server, then bad input."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
import torch

from neuronserve import tick as T
from neuronserve import tick_sigmoid, topk
from neuronserve.tick_reference import reference_tick
from neuronserve.config import ServerConfig
from neuronserve.errors import InvalidInput
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server
from support import LoopThread

pytestmark = pytest.mark.timeout(120)

COMBOS = [(space, mutual) for space in T.LABEL_SPACES for mutual in T.MUTUALS
          if not (space == T.LOGIT and mutual in (T.PRODUCT, T.HARMONIC_MEAN))]
ATOL = 1e-5


# ---- the tick module against the reference --------------------------------------------------------


@pytest.fixture(params=["compiled", "numpy"])
def host_path(request, monkeypatch):
    """The host path under test: the compiled kernels (tick_kernels.py) or numpy and torch."""
    if request.param == "numpy":
        monkeypatch.setattr(T, "KERNELS", None)
    elif T.KERNELS is None:
        pytest.skip("the tick kernels were not built")
    return request.param


def pool_case(seed: int, n: int, k_labels: int = 3, d: int = 8, quantized: bool = False):
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(-500, 5000), n, replace=False).astype(np.int64)
    if quantized:  # small dyadic values: every dot product exact in float32, so equal vectors tie exactly
        users = (rng.integers(-2, 3, (n, k_labels, d)) * 0.25).astype(np.float32)
        peers = (rng.integers(-2, 3, (n, k_labels, d)) * 0.25).astype(np.float32)
        dup = rng.choice(n, n // 2, replace=True)
        users[dup[: n // 4]] = users[dup[n // 4 :][: n // 4]]  # duplicated rows: many exact ties
        peers[dup[: n // 4]] = peers[dup[n // 4 :][: n // 4]]
        bias = (rng.integers(-2, 3, k_labels) * 0.25).astype(np.float32)
    else:
        users = rng.standard_normal((n, k_labels, d)).astype(np.float32) * 0.5
        peers = rng.standard_normal((n, k_labels, d)).astype(np.float32) * 0.5
        bias = rng.standard_normal(k_labels).astype(np.float32)
    return ids, users, peers, bias


def run_pool(ids, users, peers, bias, spec, blocked=(None, None), **kwargs):
    order = np.argsort(ids)
    cols = ids[order]
    excluded = T.exclusions(ids, cols, exclude_self=True, blocked_rows=blocked[0], blocked_cols=blocked[1], symmetric=True)
    args = (ids, cols, users, peers[order], bias, spec)
    extra = dict(rows_peer=peers, cols_user=users[order], excluded=excluded)
    return T.score_tick(*args, **extra, **kwargs), reference_tick(*args, **extra)


def assert_same(got: T.TickResult, want: T.TickResult, exact_ids: bool = False) -> None:
    np.testing.assert_array_equal(got.counts, want.counts)
    np.testing.assert_allclose(got.values, want.values, atol=ATOL, rtol=1e-5)
    if exact_ids:
        np.testing.assert_array_equal(got.ids, want.ids)
    else:  # ids equal except among values closer than float32 can order: there, the same value
        v = want.values
        close = np.zeros_like(v, bool)
        with np.errstate(invalid="ignore"):  # -inf padding minus -inf padding
            gap = np.abs(v[:, 1:] - v[:, :-1]) < 10 * ATOL
        close[:, 1:] |= gap
        close[:, :-1] |= gap
        np.testing.assert_array_equal(got.ids[~close], want.ids[~close])
        for row in range(len(v)):
            assert len(set(got.ids[row, : got.counts[row]])) == got.counts[row]
    pad = np.arange(got.ids.shape[1])[None, :] >= got.counts[:, None]
    assert (got.ids[pad] == T.PAD_ID).all() and np.isneginf(got.values[pad]).all()
    for name in ("label_scores", "reverse_label_scores"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:  # where a near-tie swapped two ids, their label scores swapped too
            same = got.ids == want.ids
            np.testing.assert_allclose(a[same], b[same], atol=1e-4)


@pytest.mark.usefixtures("host_path")
@pytest.mark.parametrize("space,mutual", COMBOS)
@pytest.mark.parametrize("threads", [1, 2])
def test_pool_tick_equals_the_reference(space, mutual, threads):
    ids, users, peers, bias = pool_case(1, 90)
    weights = [0.5, 1.25, 0.25] if mutual in (T.PRODUCT, T.HARMONIC_MEAN) else [0.5, -1.0, 2.0]
    spec = T.make_spec(9, weights, 3, len(ids) - 1, label_space=space, mutual=mutual, include_label_scores=True)
    blocked = (ids[:12], ids[30:42])
    got, want = run_pool(ids, users, peers, bias, spec, blocked, block_rows=16, threads=threads)
    assert_same(got, want)
    for row, person in enumerate(ids):  # never itself, never a blocked partner (either side of the pair)
        assert person not in got.ids[row]
    for a, b in zip(*blocked, strict=True):
        assert b not in got.ids[np.flatnonzero(ids == a)[0]] and a not in got.ids[np.flatnonzero(ids == b)[0]]


@pytest.mark.usefixtures("host_path")
@pytest.mark.parametrize("space,mutual", COMBOS)
def test_ties_are_broken_by_the_lower_peer_id(space, mutual):
    ids, users, peers, bias = pool_case(2, 64, quantized=True)
    spec = T.make_spec(20, [0.5, 0.25, 1.0], 3, len(ids) - 1, label_space=space, mutual=mutual)
    got, want = run_pool(ids, users, peers, bias, spec, block_rows=16, threads=2)
    ties = np.count_nonzero(want.values[:, 1:] == want.values[:, :-1])
    assert ties > 50, "the case must hold ties"
    assert_same(got, want, exact_ids=True)


@pytest.mark.usefixtures("host_path")
def test_default_weights_are_the_mean_and_rows_keep_the_request_order():
    ids, users, peers, bias = pool_case(3, 40)
    spec = T.make_spec(5, [], 3, 39)
    np.testing.assert_allclose(spec.weights, [1 / 3] * 3)
    got, want = run_pool(ids, users, peers, bias, spec, block_rows=7)
    assert_same(got, want)


@pytest.mark.usefixtures("host_path")
def test_rows_with_fewer_candidates_than_k_are_padded_and_counted():
    ids, users, peers, bias = pool_case(4, 12)
    spec = T.make_spec(11, [1, 1, 1], 3, 11, mutual=T.MINIMUM)  # k = pool size - 1: every other person
    blocked = (np.repeat(ids[0], 6), ids[1:7])  # person 0 blocks 6: 5 left; persons 1..6 lose one
    got, want = run_pool(ids, users, peers, bias, spec, blocked, block_rows=5)
    assert_same(got, want)
    assert got.counts[0] == 5 and list(got.counts[1:7]) == [10] * 6 and list(got.counts[7:]) == [11] * 5
    assert (got.ids[0, 5:] == T.PAD_ID).all()


@pytest.mark.usefixtures("host_path")
@pytest.mark.parametrize("space,mutual", COMBOS)
def test_users_x_peers_tick_equals_the_reference(space, mutual):
    rng = np.random.default_rng(5)
    n, m, k_labels, d = 23, 57, 3, 8
    user_ids = rng.choice(1000, n, replace=False).astype(np.int64)
    peer_ids = np.sort(rng.choice(1000, m, replace=False)).astype(np.int64)
    vec = lambda rows: rng.standard_normal((rows, k_labels, d)).astype(np.float32) * 0.5  # noqa: E731
    rows_user, rows_peer, cols_peer, cols_user = vec(n), vec(n), vec(m), vec(m)
    bias = rng.standard_normal(k_labels).astype(np.float32)
    blocked = (user_ids[:4], peer_ids[:4])
    excluded = T.exclusions(user_ids, peer_ids, exclude_self=False, blocked_rows=blocked[0], blocked_cols=blocked[1])
    spec = T.make_spec(m - 1, [0.5, 1.0, 0.25], k_labels, m, label_space=space, mutual=mutual, include_label_scores=True)
    args = (user_ids, peer_ids, rows_user, cols_peer, bias, spec)
    extra = dict(rows_peer=rows_peer, cols_user=cols_user, excluded=excluded)
    assert_same(T.score_tick(*args, **extra, block_rows=8, threads=2), reference_tick(*args, **extra))


@pytest.mark.usefixtures("host_path")
@pytest.mark.parametrize("space,mutual", [(T.PROBABILITY, T.PRODUCT), (T.LOGIT, T.MINIMUM), (T.LOGIT, T.ONE_WAY)])
@pytest.mark.parametrize("quantized", [False, True])
def test_the_pruned_top_k_equals_the_reference(space, mutual, quantized):
    # 650 candidates, k = 6: 21 chunks of 32 columns (the last one ragged), so the pruned search runs;
    # quantized vectors tie at the chunks' bound, and person 0 blocks all but 3 (-inf at the bound)
    ids, users, peers, bias = pool_case(9, 651, quantized=quantized)
    spec = T.make_spec(6, [0.5, 0.25, 1.0], 3, len(ids) - 1, label_space=space, mutual=mutual)
    blocked = (np.repeat(ids[0], len(ids) - 4), ids[4:])
    got, want = run_pool(ids, users, peers, bias, spec, blocked, block_rows=64, threads=2)
    assert topk.padded_width(650) // topk.CHUNK_COLUMNS >= 2 * spec.k
    assert got.counts[0] == 3
    assert_same(got, want, exact_ids=quantized)


@pytest.mark.parametrize("m", [64 * 5, 64 * 5 + 17])
def test_top_k_on_ties_and_minus_infinity_equals_a_full_sort(m):
    rng = np.random.default_rng(m)
    k, width = 5, topk.padded_width(m)
    values = np.full((40, width), -np.inf, np.float32)
    values[:, :m] = rng.integers(0, 6, (40, m)).astype(np.float32)  # six values: ties everywhere
    values[:10, : m - 2] = -np.inf  # rows with 2 finite values: -inf ties at the bound
    values[10:20, :m] = rng.standard_normal((10, m)).astype(np.float32)
    top = topk.top_k(values, k, m)
    for row in range(len(values)):
        want = np.lexsort((np.arange(m), -values[row, :m]))[:k]
        np.testing.assert_array_equal(top[row], want)


@pytest.fixture(params=[1, 2], ids=["torch 1 thread", "torch 2 threads"])
def torch_threads(request):
    """torch's intra-op threads for the test (one: sigmoid_ makes one call; more: chunks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_sigmoid_gives_equal_logits_equal_probabilities_wherever_they_sit(torch_threads):
    # torch computes a range's last partial vector with a scalar routine: a logit in the last 32 elements
    # (and at a chunk's end) must get the bits it gets anywhere else
    rng = np.random.default_rng(12)
    logits = rng.standard_normal(tick_sigmoid.SIGMOID_CHUNK * 2 + 32 * 7).astype(np.float32) * 4
    logits[-40:] = logits[:40]  # the tail holds values of the body
    chunk = tick_sigmoid.SIGMOID_CHUNK
    logits[chunk - 16 : chunk + 16] = logits[100:132]  # across a chunk boundary
    got = tick_sigmoid.sigmoid_(logits.copy())
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[-40:], got[:40])
    np.testing.assert_array_equal(got[chunk - 16 : chunk + 16], got[100:132])
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits.astype(np.float64))), rtol=1e-6, atol=1e-7)
    by_one = np.array([tick_sigmoid.sigmoid_(np.full(32, x, np.float32))[0] for x in logits[:40]])
    np.testing.assert_array_equal(by_one, got[:40])
    for bad in (np.zeros(33, np.float32), np.zeros(64, np.float64), np.zeros((64, 2), np.float32)[:, 0]):
        with pytest.raises(ValueError, match="multiple of 32"):
            tick_sigmoid.sigmoid_(bad)


def test_first_k_orders_by_value_then_column_and_takes_zero_and_minus_zero_as_equal():
    values = np.array([0.5, -0.0, 0.0, 0.5, -np.inf, 2.0, -np.inf, -np.inf], np.float32)
    rows = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    cols = np.array([1, 3, 4, 9, 11, 0, 2, 5])
    top = topk.first_k(values, rows, cols, 2, 3)
    np.testing.assert_array_equal(top, [[1, 9, 3], [0, 2, 5]])  # -0.0 == 0.0: the lower column first


@pytest.mark.usefixtures("host_path")
@pytest.mark.parametrize("mutual", [T.ONE_WAY, T.PRODUCT, T.HARMONIC_MEAN])
def test_ties_across_the_padded_fill_tile_equal_the_reference(mutual, monkeypatch):
    # 75 people in fill tiles of 32 columns: the last tile holds 11 columns and 21 stale scratch columns;
    # the last people are copies of the first, so equal values sit in the body and in the ragged tail
    monkeypatch.setattr(T, "FILL_COLUMNS", 32)
    ids, users, peers, bias = pool_case(13, 75, quantized=True)
    order = np.argsort(ids)
    users[order[-6:]], peers[order[-6:]] = users[order[:6]], peers[order[:6]]
    spec = T.make_spec(10, [0.5, 0.5, 0.5], 3, len(ids) - 1, mutual=mutual)
    for pool in (False, True):
        got, want = run_pool(ids, users, peers, bias, spec, block_rows=16, threads=2, pool=pool)
        assert_same(got, want, exact_ids=True)
    spec = T.make_spec(10, [0.25, 1.0, 0.5], 3, len(ids) - 1, mutual=mutual)  # weights not uniform
    got, want = run_pool(ids, users, peers, bias, spec, block_rows=16, threads=2, pool=True)
    assert_same(got, want, exact_ids=True)
    assert got.values.dtype == np.float32


@pytest.mark.usefixtures("host_path")
def test_a_larger_pool_in_default_blocks_equals_the_reference():
    ids, users, peers, bias = pool_case(6, 700, k_labels=4, d=16)
    spec = T.make_spec(50, [1, 1, 1, 1], 4, 699, mutual=T.PRODUCT)
    got, want = run_pool(ids, users, peers, bias, spec)
    assert_same(got, want)


@pytest.mark.usefixtures("host_path")
@pytest.mark.parametrize("space,mutual", [c for c in COMBOS if c[1] != T.ONE_WAY])
@pytest.mark.parametrize("quantized", [False, True])
def test_the_pool_matrix_path_equals_the_reference_and_the_two_direction_path(space, mutual, quantized, monkeypatch):
    ids, users, peers, bias = pool_case(7, 75, quantized=quantized)
    spec = T.make_spec(12, [0.5, 0.25, 1.0], 3, len(ids) - 1, label_space=space, mutual=mutual, include_label_scores=True)
    blocked = (ids[:10], ids[20:30])
    kwargs = dict(block_rows=16, threads=2, pool=True)
    monkeypatch.setattr(T, "POOL_MATRIX_BYTES", 0)  # 75 x 75 does not fit: both directions per block
    two_way, want = run_pool(ids, users, peers, bias, spec, blocked, **kwargs)
    monkeypatch.setattr(T, "POOL_MATRIX_BYTES", 4 * 75 * 75)  # fits exactly; and never the reverse direction
    monkeypatch.setattr(T, "_reverse_block", lambda *a: pytest.fail("the pool matrix path computed c(v->u)"))
    got, _ = run_pool(ids, users, peers, bias, spec, blocked, **kwargs)
    if quantized:
        assert np.count_nonzero(want.values[:, 1:] == want.values[:, :-1]) > 50, "the case must hold ties"
    assert_same(got, want, exact_ids=quantized)
    assert_same(two_way, want, exact_ids=quantized)
    assert_same(got, two_way, exact_ids=quantized)


@pytest.mark.usefixtures("host_path")
def test_the_pool_matrix_in_given_memory_equals_the_reference_whatever_it_held():
    ids, users, peers, bias = pool_case(10, 80)
    spec = T.make_spec(6, [0.5, 0.25, 1.0], 3, len(ids) - 1, mutual=T.PRODUCT)
    memory = np.full(80 * 80 + 9, np.nan, np.float32)  # larger than needed, and garbage
    got, want = run_pool(ids, users, peers, bias, spec, (ids[:5], ids[40:45]), block_rows=16, threads=2, pool=True, matrix=memory)
    assert_same(got, want)
    with pytest.raises(ValueError, match="at least 80 x 80"):
        run_pool(ids, users, peers, bias, spec, pool=True, matrix=memory[:100])


def test_the_pool_matrix_path_refuses_rows_that_are_not_the_columns():
    ids, users, peers, bias = pool_case(8, 10)
    spec = T.make_spec(3, [1, 1, 1], 3, 9, mutual=T.MINIMUM)
    order = np.argsort(ids)
    with pytest.raises(ValueError, match="col_ids"):
        T.score_tick(ids[:-1], ids[order], users[:-1], peers[order], bias, spec, rows_peer=peers[:-1], cols_user=users[order], pool=True)


def test_a_stopped_tick_starts_no_block_after_the_stop_and_raises(monkeypatch):
    ids, users, peers, bias = pool_case(3, 40)
    spec = T.make_spec(3, [1, 1, 1], 3, 39, mutual=T.MINIMUM)
    stop, starts, block = threading.Event(), [], T.HostDirection.block

    def counted(self, start, *args, **kwargs):
        starts.append(start)
        stop.set()  # the caller goes away during the first block
        return block(self, start, *args, **kwargs)

    monkeypatch.setattr(T.HostDirection, "block", counted)
    order = np.argsort(ids)
    with pytest.raises(T.TickStopped, match="40 x 40"):
        T.score_tick(ids, ids[order], users, peers[order], bias, spec, rows_peer=peers, cols_user=users[order],
                     block_rows=8, threads=1, stop=stop)
    assert set(starts) == {0}  # the block in progress (both its directions), none of the four after it


@pytest.mark.parametrize("kwargs,words", [
    (dict(k=0), ["k must be >= 1"]),
    (dict(k=-3), ["k must be >= 1"]),
    (dict(k=10), ["k=10", "9 candidates"]),
    (dict(weights=[1, 2]), ["weights has 2 values", "3"]),
    (dict(weights=[1, float("nan"), 2]), ["weights[1]", "finite"]),
    (dict(weights=[1, float("inf"), 2]), ["weights[1]", "finite"]),
    (dict(mutual=T.PRODUCT, label_space=T.LOGIT), ["PRODUCT", "PROBABILITY"]),
    (dict(mutual=T.HARMONIC_MEAN, weights=[1, -1, 1]), ["HARMONIC_MEAN", "weight >= 0"]),
])
def test_make_spec_refuses_bad_input(kwargs, words):
    args = dict(k=3, weights=[1, 1, 1])
    args.update(kwargs)
    with pytest.raises(InvalidInput) as info:
        T.make_spec(args.pop("k"), args.pop("weights"), 3, 9, **args)
    for word in words:
        assert word in str(info.value)


# ---- ScoreTick through a real server --------------------------------------------------------------

MAX_PEERS = 64


@pytest.fixture(scope="module")
def served(small_artifact):
    loop = LoopThread()
    server = Server(ServerConfig(artifact=str(small_artifact.directory), port=0, metrics_port=None, max_peers=MAX_PEERS, max_tick_ids=MAX_PEERS, backend="cpu", cores=1))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.ScorerStub(channel)
    cfg = small_artifact.model_config
    rng = np.random.default_rng(11)
    pool = rng.choice(np.arange(1, 10_000), 40, replace=False).astype(np.int64)
    for kind, width in ((pb.USER, cfg.user_features), (pb.PEER, cfg.peer_features)):
        features = rng.standard_normal((len(pool), width)).astype("<f4")
        stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=kind, ids=pool.tolist(), features=pb.Tensor(data=features.tobytes(), shape=features.shape)), timeout=20)
    only_users = np.array([20_001, 20_002, 20_003], np.int64)  # cached as users only
    features = rng.standard_normal((3, cfg.user_features)).astype("<f4")
    stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.USER, ids=only_users.tolist(), features=pb.Tensor(data=features.tobytes(), shape=features.shape)), timeout=20)
    yield server, stub, pool, only_users
    channel.close()
    loop.run(server.stop(5.0))
    loop.close()


def packed(ids) -> bytes:
    return np.asarray(ids, "<i8").tobytes()


def decode(reply: pb.ScoreTickResponse, n: int):
    k = reply.k
    ids = np.frombuffer(reply.ids, "<i8").reshape(n, k)
    values = np.frombuffer(reply.values.data, "<f4").reshape(tuple(reply.values.shape))
    counts = np.frombuffer(reply.counts, "<i4")
    labels = np.frombuffer(reply.label_scores.data, "<f4").reshape(tuple(reply.label_scores.shape)) if reply.label_scores.shape else None
    back = np.frombuffer(reply.reverse_label_scores.data, "<f4").reshape(tuple(reply.reverse_label_scores.shape)) if reply.reverse_label_scores.shape else None
    return T.TickResult(ids, values, counts, labels, back)


SPACES = {T.PROBABILITY: pb.ScoreTickRequest.PROBABILITY, T.LOGIT: pb.ScoreTickRequest.LOGIT}
MUTUALS = {T.ONE_WAY: pb.ScoreTickRequest.ONE_WAY, T.PRODUCT: pb.ScoreTickRequest.PRODUCT,
           T.MINIMUM: pb.ScoreTickRequest.MINIMUM, T.HARMONIC_MEAN: pb.ScoreTickRequest.HARMONIC_MEAN}


@pytest.mark.parametrize("space,mutual", COMBOS)
@pytest.mark.parametrize("form", ["repeated", "packed", "packed, ascending"])
def test_score_tick_on_a_pool_equals_the_reference(served, small_artifact, space, mutual, form):
    server, stub, pool, _ = served
    if form == "packed, ascending":  # the columns' order as sent: no reordered copies
        pool = np.sort(pool)
    k_labels = small_artifact.model_config.num_labels
    weights = [0.5, 1.5, 0.25][:k_labels]
    blocked_a, blocked_b = pool[:3], pool[10:13]
    request = pb.ScoreTickRequest(k=7, weights=weights, label_space=SPACES[space], mutual=MUTUALS[mutual], include_label_scores=True)
    if form.startswith("packed"):
        request.pool_ids_packed, request.blocked_user_ids_packed, request.blocked_peer_ids_packed = packed(pool), packed(blocked_a), packed(blocked_b)
    else:
        request.pool_ids.extend(pool.tolist()), request.blocked_user_ids.extend(blocked_a.tolist()), request.blocked_peer_ids.extend(blocked_b.tolist())
    reply = stub.ScoreTick(request, timeout=20)
    assert reply.model_version == small_artifact.model_version and list(reply.label_names) == list(small_artifact.label_names)
    users, peers = server.cache.lookup("user", pool), server.cache.lookup("peer", pool)
    bias = np.asarray(small_artifact.label_bias, np.float32)
    order = np.argsort(pool)
    spec = T.make_spec(7, weights, k_labels, len(pool) - 1, label_space=space, mutual=mutual, include_label_scores=True)
    excluded = T.exclusions(pool, pool[order], exclude_self=True, blocked_rows=blocked_a, blocked_cols=blocked_b, symmetric=True)
    want = reference_tick(pool, pool[order], users, peers[order], bias, spec, rows_peer=peers, cols_user=users[order], excluded=excluded)
    assert_same(decode(reply, len(pool)), want)


def test_a_mutual_pool_tick_leaves_its_matrix_kept_for_the_next(served):
    server, stub, pool, _ = served
    gate = server.state.scoring
    request = pb.ScoreTickRequest(pool_ids_packed=packed(pool), k=3, mutual=pb.ScoreTickRequest.MINIMUM)
    first = stub.ScoreTick(request, timeout=20)
    assert gate.kept_bytes >= 4 * len(pool) ** 2 and gate.reserved == gate.kept_bytes  # kept, and counted
    second = stub.ScoreTick(request, timeout=20)  # in the kept memory: the same answer
    assert second.ids == first.ids and second.values.data == first.values.data


def test_a_cancelled_tick_leaves_no_matrix_for_the_next_and_holds_its_bytes_until_its_thread_ends(served, monkeypatch):
    # the cancelled call's thread goes on writing its matrix: the gate must not hand it to another tick,
    # nor let another call have its bytes before the thread returns
    server, _, pool, _ = served
    scorer, gate = server._servicers[0], server.state.scoring
    started, release = threading.Event(), threading.Event()
    tick_work = type(scorer)._tick

    def held_tick(self, *args):
        started.set()
        release.wait(20)
        return tick_work(self, *args)

    monkeypatch.setattr(type(scorer), "_tick", held_tick)
    request = pb.ScoreTickRequest(pool_ids_packed=packed(pool), k=3, mutual=pb.ScoreTickRequest.MINIMUM)

    async def cancel_it_midway():
        call = asyncio.ensure_future(scorer._score_tick(request, None))
        await asyncio.to_thread(started.wait, 20)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    async def released():
        while gate.reserved:
            await asyncio.sleep(0)  # a turn of the loop: the thread's done callback releases on it

    loop = asyncio.new_event_loop()  # not asyncio.run: it would wait for the held thread
    try:
        loop.run_until_complete(cancel_it_midway())
        held = gate.reserved
        assert gate.kept_bytes == 0 and held > 0  # the thread still holds the matrix, and its bytes are still reserved
    finally:
        release.set()
    try:
        loop.run_until_complete(asyncio.wait_for(released(), 20))  # once the thread has returned
    finally:
        loop.close()
    assert gate.kept_bytes == 0


def test_score_tick_label_scores_equal_score_by_ids(served):
    server, stub, pool, _ = served
    reply = stub.ScoreTick(pb.ScoreTickRequest(pool_ids=pool.tolist(), k=5, include_label_scores=True), timeout=20)
    got = decode(reply, len(pool))
    assert got.reverse_label_scores is None
    for row in (0, 17, 39):
        by_ids = stub.ScoreByIds(pb.ScoreByIdsRequest(user_id=int(pool[row]), peer_ids=got.ids[row].tolist()), timeout=10)
        scores = np.frombuffer(by_ids.scores.data, "<f4").reshape(tuple(by_ids.scores.shape))
        np.testing.assert_allclose(got.label_scores[row], scores, atol=1e-5)


def test_score_tick_users_x_peers_mutual_needs_both_kinds(served, small_artifact):
    server, stub, pool, only_users = served
    users, peers = pool[:10], pool[10:]
    reply = stub.ScoreTick(pb.ScoreTickRequest(user_ids_packed=packed(users), peer_ids=peers.tolist(), k=30, mutual=pb.ScoreTickRequest.MINIMUM), timeout=20)
    k_labels = small_artifact.model_config.num_labels
    spec = T.make_spec(30, [], k_labels, len(peers), mutual=T.MINIMUM)
    order = np.argsort(peers)
    cols = peers[order]
    want = reference_tick(users, cols, server.cache.lookup("user", users), server.cache.lookup("peer", cols), np.asarray(small_artifact.label_bias, np.float32),
                            spec, rows_peer=server.cache.lookup("peer", users), cols_user=server.cache.lookup("user", cols))
    assert_same(decode(reply, len(users)), want)
    # one way, users cached only as users are fine; mutual needs them as peers too
    stub.ScoreTick(pb.ScoreTickRequest(user_ids=only_users.tolist(), peer_ids=peers.tolist(), k=3), timeout=20)
    error = rpc_error(stub.ScoreTick, pb.ScoreTickRequest(user_ids=only_users.tolist(), peer_ids=peers.tolist(), k=3, mutual=pb.ScoreTickRequest.PRODUCT))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "as peers" in error.details() and "20001" in error.details()


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=20)
    return info.value


INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def bad_cases(pool):
    p = pool.tolist()
    return [
        ("unknown-pool-id", dict(pool_ids=p[:5] + [987_654_321], k=2), NOT_FOUND, ["pool_ids", "987654321"]),
        ("unknown-peer-id", dict(user_ids=p[:2], peer_ids_packed=packed(p[2:5] + [55_555_555]), k=2), NOT_FOUND, ["peer_ids", "55555555"]),
        ("k-zero", dict(pool_ids=p, k=0), INVALID, ["k must be >= 1"]),
        ("k-negative", dict(pool_ids=p, k=-1), INVALID, ["k must be >= 1"]),
        ("k-above-pool", dict(pool_ids=p[:6], k=6), INVALID, ["k=6", "5 candidates", "pool size - 1"]),
        ("k-above-peers", dict(user_ids=p[:2], peer_ids=p[2:6], k=5), INVALID, ["k=5", "4 candidates", "peer_ids"]),
        ("pool-of-one", dict(pool_ids=p[:1], k=1), INVALID, ["pool size - 1 is 0", "at least 2 people"]),
        ("weights-overflow", dict(pool_ids=p, k=2, weights=[3e38] * 3), INVALID, ["overflow float32", "weights"]),
        ("weights-length", dict(pool_ids=p, k=2, weights=[1.0]), INVALID, ["weights has 1 values"]),
        ("weights-nan", dict(pool_ids=p, k=2, weights=[1.0, float("nan"), 1.0]), INVALID, ["weights[1]", "finite"]),
        ("weights-inf", dict(pool_ids=p, k=2, weights=[float("-inf"), 1.0, 1.0]), INVALID, ["weights[0]", "finite"]),
        ("pool-above-max-tick-ids", dict(pool_ids_packed=packed(np.arange(1, MAX_PEERS + 2)), k=2), INVALID, ["pool_ids_packed", str(MAX_PEERS + 1), "max_tick_ids"]),
        ("duplicate-pool-ids", dict(pool_ids=p[:4] + [p[1]], k=2), INVALID, ["pool_ids", "distinct", str(p[1])]),
        ("duplicate-peer-ids", dict(user_ids=p[:2], peer_ids=[p[3], p[3]], k=1), INVALID, ["peer_ids", "distinct"]),
        ("both-forms", dict(pool_ids=p[:4], pool_ids_packed=packed(p[:4]), k=2), INVALID, ["pool_ids and pool_ids_packed"]),
        ("packed-length", dict(pool_ids_packed=packed(p[:4])[:-3], k=2), INVALID, ["pool_ids_packed", "29 bytes"]),
        ("no-ids", dict(k=2), INVALID, ["pool_ids", "user_ids and peer_ids"]),
        ("pool-and-users", dict(pool_ids=p[:4], user_ids=p[:2], peer_ids=p[2:4], k=1), INVALID, ["either pool_ids"]),
        ("users-without-peers", dict(user_ids=p[:4], k=1), INVALID, ["peer_ids is missing"]),
        ("blocked-lengths", dict(pool_ids=p, k=2, blocked_user_ids=p[:3], blocked_peer_ids=p[3:5]), INVALID, ["blocked_user_ids", "parallel", "3 and 2"]),
        ("product-of-logits", dict(pool_ids=p, k=2, label_space=pb.ScoreTickRequest.LOGIT, mutual=pb.ScoreTickRequest.PRODUCT), INVALID, ["PRODUCT", "PROBABILITY"]),
        ("unknown-mutual", dict(pool_ids=p, k=2, mutual=9), INVALID, ["mutual", "9"]),
    ]


def test_bad_input_gets_its_status_and_a_message_naming_the_field(served, small_artifact):
    _, stub, pool, _ = served
    for name, fields, status, words in bad_cases(pool):
        error = rpc_error(stub.ScoreTick, pb.ScoreTickRequest(**fields))
        assert error.code() == status, (name, error.details())
        for word in words:
            assert word in error.details(), (name, word, error.details())
