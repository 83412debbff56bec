"""neuronserve.v1.Scorer: Score (features through the towers), UpsertEmbeddings, and scoring from the
cached tower outputs (ScoreByIds, ScoreMatrix, ScoreTick). Built on service.py's guard and codec."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time

import numpy as np

from neuronserve import tick
from neuronserve.errors import InvalidInput
from neuronserve.memory_budget import (
    MAX_BLOCKED_PAIRS,
    ModelShape,
    Reservation,
    matrix_working_bytes,
    stream_working_bytes,
    tick_working_bytes,
)
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.versions import Route
from neuronserve.service import (
    CACHED,
    TOWERS,
    TWOTOWER,
    Servicer,
    check_reply_size,
    deadline_of,
    feature_rows,
    finite_output,
    id_list,
    ids_required,
    one_user,
    scores_checked,
    tensor_array,
    tensor_proto,
)

log = logging.getLogger(__name__)

MATRIX_BLOCK_BYTES = 4 << 20  # ScoreMatrixStream: scores per reply, at most (one user row at least)


class ScorerService(Servicer, pb_grpc.ScorerServicer):
    """neuronserve.v1.Scorer: score by features (through the towers) or by cached tower outputs. ScoreMatrix,
    ScoreMatrixStream and ScoreTick reserve their working memory in the state's ScoringGate first."""

    @property
    def shape(self) -> ModelShape:
        info = self.info
        return ModelShape(info.user_features, info.peer_features, info.num_labels, info.label_dim)

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self._answer(context, TWOTOWER, self._score, request)

    async def UpsertEmbeddings(self, request: pb.UpsertEmbeddingsRequest, context) -> pb.UpsertEmbeddingsResponse:
        model = {pb.USER: TOWERS[0], pb.PEER: TOWERS[1]}.get(request.kind, TOWERS[0])
        return await self._answer(context, model, self._upsert, request)

    async def ScoreByIds(self, request: pb.ScoreByIdsRequest, context) -> pb.ScoreResponse:
        return await self._answer(context, CACHED, self._score_by_ids, request)

    async def ScoreMatrix(self, request: pb.ScoreMatrixRequest, context) -> pb.ScoreMatrixResponse:
        return await self._answer(context, CACHED, self._score_matrix, request)

    async def ScoreMatrixStream(self, request: pb.ScoreMatrixRequest, context) -> None:
        await self._answer(context, CACHED, self._score_matrix_stream, request)

    async def ScoreTick(self, request: pb.ScoreTickRequest, context) -> pb.ScoreTickResponse:
        return await self._answer(context, CACHED, self._score_tick, request)

    async def _score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        info = self.info
        route = self.versions.route(request.model_version, request.user_id if request.HasField("user_id") else None)
        served = route.served
        user = one_user(tensor_array(request.user_features, "user_features"), "user_features", info.user_features, True)
        peers = feature_rows(
            tensor_array(request.peer_features, "peer_features"),
            "peer_features",
            info.peer_features,
            info.max_peers,
            "max_peers",
            False,
        )
        scores = await served.runtime.score(user, peers, deadline_of(context))
        scores_checked(scores, (user, peers), ("user_features", "peer_features"))
        return pb.ScoreResponse(
            scores=tensor_proto(scores),
            label_names=info.label_names,
            model_version=served.info.version,
            version=served.version,
            arm=route.arm,
            burn_in=route.burn_in,
        )

    async def _upsert(self, request: pb.UpsertEmbeddingsRequest, context) -> pb.UpsertEmbeddingsResponse:
        info = self.info
        served = self.versions.route(request.model_version, experiment=False).served  # upserts go where named
        if request.kind not in (pb.USER, pb.PEER):
            name = pb.EntityKind.Name(request.kind) if request.kind in pb.EntityKind.values() else str(request.kind)
            raise InvalidInput(f"kind must be USER or PEER, got {name}")
        kind, tower, width = (
            ("user", TOWERS[0], info.user_features)
            if request.kind == pb.USER
            else ("peer", TOWERS[1], info.peer_features)
        )
        ids = ids_required(request.ids, request.ids_packed, "ids", info.max_tower_rows, "max_queue_rows")
        features = feature_rows(
            tensor_array(request.features, "features"), "features", width, info.max_tower_rows, "max_queue_rows"
        )
        if features.shape[0] != ids.size:
            raise InvalidInput(
                f"features has {features.shape[0]} rows for {ids.size} ids; send one row of {width} features per id"
            )
        served.cache.check_upsert(kind, ids)  # before the tower run: a bad request costs no core time
        vectors = finite_output(await served.runtime.embed(tower, features, deadline_of(context)), f"{tower} output")
        # in a worker thread: an upsert copies the kind's table (~1 ms per 2,500 cached rows), which must
        # not stall the event loop; writers take the cache's lock, readers keep their snapshot
        rows = await asyncio.to_thread(served.cache.upsert, kind, ids, vectors, served.info.version)
        return pb.UpsertEmbeddingsResponse(upserted=ids.size, cache_rows=rows, model_version=served.info.version)

    async def _score_by_ids(self, request: pb.ScoreByIdsRequest, context) -> pb.ScoreResponse:
        route = self.versions.route(request.model_version, int(request.user_id))
        served = route.served
        peer_ids = ids_required(request.peer_ids, request.peer_ids_packed, "peer_ids", self.info.max_peers, "max_peers")
        labels = self.info.num_labels
        check_reply_size(
            peer_ids.size * labels,
            f"{peer_ids.size} peer_ids x {labels} labels",
            "send fewer peer_ids",
            self.info.max_message_bytes,
        )
        start = time.perf_counter()
        scores = served.cache.score_by_ids(int(request.user_id), peer_ids)  # 1,000 peers: ~0.08 ms (compiled)
        finite_output(scores, "scores")
        self.metrics.execution(CACHED, rows=peer_ids.size, requests=1, compute_s=time.perf_counter() - start)
        return pb.ScoreResponse(
            scores=tensor_proto(scores),
            label_names=self.info.label_names,
            model_version=served.info.version,
            version=served.version,
            arm=route.arm,
            burn_in=route.burn_in,
        )

    async def _score_matrix(self, request: pb.ScoreMatrixRequest, context) -> pb.ScoreMatrixResponse:
        """N users x M peers on the host's BLAS (per label one [N, D] x [D, M] matmul over the cached tower
        outputs), in a worker thread; why not on the cores: docs/embeddings.md (ScoreMatrix)."""
        info = self.info
        route = self.versions.route(request.model_version)  # several users: A/B does not apply
        served = route.served
        user_ids, peer_ids = self._matrix_ids(request)
        check_reply_size(
            user_ids.size * peer_ids.size * info.num_labels,
            f"{user_ids.size} user_ids x {peer_ids.size} peer_ids x {info.num_labels} labels",
            "use ScoreMatrixStream (the same matrix in blocks of user rows) or send fewer ids",
            info.max_message_bytes,
        )
        need = matrix_working_bytes(self.shape, user_ids.size, peer_ids.size)
        with self.state.scoring.reserve(need, f"ScoreMatrix of {user_ids.size} x {peer_ids.size} ids") as held:
            start = time.perf_counter()
            scores = await held.run(functools.partial(_score_matrix, served.cache, user_ids, peer_ids))
            self.metrics.execution(
                CACHED, rows=user_ids.size * peer_ids.size, requests=1, compute_s=time.perf_counter() - start
            )
            return pb.ScoreMatrixResponse(
                scores=tensor_proto(finite_output(scores, "scores")),
                label_names=info.label_names,
                model_version=served.info.version,
                version=served.version,
                arm=route.arm,
                burn_in=route.burn_in,
            )

    def _matrix_ids(self, request: pb.ScoreMatrixRequest) -> tuple[np.ndarray, np.ndarray]:
        limit = (self.info.max_peers, "max_peers")
        return (
            ids_required(request.user_ids, request.user_ids_packed, "user_ids", *limit),
            ids_required(request.peer_ids, request.peer_ids_packed, "peer_ids", *limit),
        )

    async def _score_matrix_stream(self, request: pb.ScoreMatrixRequest, context) -> None:
        """ScoreMatrix in blocks of whole user rows, written in order: max(1, min(MATRIX_BLOCK_BYTES,
        max_message_bytes // 2) // (4 * M * K)) rows each (one row must fit max_message_bytes). Each block
        reads one snapshot of the cache: an upsert between two blocks shows in the later one. Every id is
        checked first (NotFound before any block); one evicted between blocks fails the block that reads it.
        A caller that goes away cancels the handler: no further block is computed."""
        info = self.info
        route = self.versions.route(request.model_version)  # several users: A/B does not apply
        served = route.served
        user_ids, peer_ids = self._matrix_ids(request)
        row_values = peer_ids.size * info.num_labels
        check_reply_size(row_values, f"one row of {row_values} scores", "send fewer peer_ids", info.max_message_bytes)
        rows = max(1, min(MATRIX_BLOCK_BYTES, info.max_message_bytes // 2) // (4 * row_values))
        need = stream_working_bytes(self.shape, min(rows, user_ids.size), peer_ids.size)
        served.cache.require([("user", user_ids, "user_ids"), ("peer", peer_ids, "peer_ids")])  # before any block
        with self.state.scoring.reserve(need, f"ScoreMatrixStream of {user_ids.size} x {peer_ids.size} ids") as held:
            await self._stream_blocks(context, held, served, route, user_ids, peer_ids, rows)

    async def _stream_blocks(
        self, context, held: Reservation, served, route: Route, user_ids, peer_ids, rows: int
    ) -> None:
        """ScoreMatrixStream's blocks of `rows` user rows, computed (under `held`) and written one at a time."""
        info = self.info
        compute_s = 0.0
        for first in range(0, user_ids.size, rows):
            block = user_ids[first : first + rows]
            start = time.perf_counter()
            scores = await held.run(functools.partial(_score_matrix, served.cache, block, peer_ids))
            compute_s += time.perf_counter() - start
            reply = pb.ScoreMatrixResponse(
                scores=tensor_proto(finite_output(scores, "scores")),
                label_names=info.label_names,
                model_version=served.info.version,
                first_user=first,
                version=served.version,
                arm=route.arm,
                burn_in=route.burn_in,
            )
            await context.write(reply)
        self.metrics.execution(CACHED, rows=user_ids.size * peer_ids.size, requests=1, compute_s=compute_s)

    async def _score_tick(self, request: pb.ScoreTickRequest, context) -> pb.ScoreTickResponse:
        """A matching tick (docs/tick.md): top-k per person from the cached vectors, in a worker thread."""
        route = self.versions.route(request.model_version)  # several users: A/B does not apply
        served = route.served
        pool, rows, cols = self._tick_people(request)
        blocked_a, blocked_b = _blocked_pairs(request)
        spec = self._tick_spec(request, rows, cols, pool is not None)
        device = served.backend.tick_device() if served.backend is not None else None
        need = tick_working_bytes(
            self.shape,
            rows.size,
            cols.size,
            spec.k,
            mutual=spec.mutual != tick.ONE_WAY,
            pool=pool is not None,
            labels=spec.include_label_scores,
            blocked=0 if blocked_a is None else blocked_a.size,
            device=device,
        )
        gate = self.state.scoring
        # a mutual pool's [N, N] working matrix: the one the gate kept from the last tick, else new once admitted
        whole = tick.uses_pool_matrix(cols.size, pool is not None, spec.mutual != tick.ONE_WAY)
        matrix = gate.take(4 * cols.size**2) if whole else None
        in_use = False  # a cancelled call's thread may still write the matrix: never keep it then
        try:
            with gate.reserve(need, f"ScoreTick of {rows.size} x {cols.size} people, k={spec.k}") as held:
                if whole and matrix is None:
                    matrix = np.empty(cols.size**2, np.float32)
                start = time.perf_counter()
                in_use = True
                result = await held.run(
                    functools.partial(
                        self._tick, served.cache, pool, rows, cols, blocked_a, blocked_b, spec, device, matrix
                    )
                )
                in_use = False
                self.metrics.execution(
                    CACHED, rows=rows.size * cols.size, requests=1, compute_s=time.perf_counter() - start
                )
                reply = self._tick_reply(result, spec, served.info.version)
        finally:
            if matrix is not None and not in_use:
                gate.keep(matrix)
        reply.version, reply.arm, reply.burn_in = served.version, route.arm, route.burn_in
        return reply

    def _tick_people(self, request: pb.ScoreTickRequest) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """(pool or None, row ids, column ids): a pool is both rows and columns; else users x peers."""
        limit = (self.info.max_tick_ids, "max_tick_ids")
        pool = id_list(request.pool_ids, request.pool_ids_packed, "pool_ids", *limit, required=False, distinct=True)
        users = id_list(request.user_ids, request.user_ids_packed, "user_ids", *limit, required=False, distinct=True)
        peers = id_list(request.peer_ids, request.peer_ids_packed, "peer_ids", *limit, required=False, distinct=True)
        if pool is not None:
            if users is not None or peers is not None:
                raise InvalidInput(
                    "send either pool_ids (or pool_ids_packed) or user_ids and peer_ids (or their _packed forms), not both"
                )
            return pool, pool, pool
        if users is None and peers is None:
            raise InvalidInput(
                "send either pool_ids (or pool_ids_packed) or user_ids and peer_ids (or their _packed forms): got neither"
            )
        if users is None or peers is None:
            raise InvalidInput(
                f"{'peer_ids' if peers is None else 'user_ids'} is missing: users x peers mode needs both user_ids and peer_ids"
            )
        return None, users, peers

    def _tick_spec(self, request: pb.ScoreTickRequest, rows: np.ndarray, cols: np.ndarray, is_pool: bool):
        """The tick's tick.TickSpec from the request, and a reply that fits max_message_bytes."""
        info = self.info
        if request.label_space not in _LABEL_SPACES:
            raise InvalidInput(f"label_space must be PROBABILITY or LOGIT, got {request.label_space}")
        if request.mutual not in _MUTUALS:
            raise InvalidInput(f"mutual must be ONE_WAY, PRODUCT, MINIMUM or HARMONIC_MEAN, got {request.mutual}")
        spec = tick.make_spec(
            request.k,
            list(request.weights),
            info.num_labels,
            rows.size - 1 if is_pool else cols.size,
            label_space=_LABEL_SPACES[request.label_space],
            mutual=_MUTUALS[request.mutual],
            include_label_scores=request.include_label_scores,
            candidates_what="pool size - 1" if is_pool else "peer_ids",
        )
        mutual = spec.mutual != tick.ONE_WAY
        per_pair = 12 + (4 * info.num_labels * (1 + mutual) if spec.include_label_scores else 0)  # id, value, labels
        check_reply_size(
            rows.size * spec.k * per_pair // 4,
            f"{rows.size} persons x k={spec.k} x {per_pair} bytes",
            "send a smaller k or split the tick",
            info.max_message_bytes,
        )
        return spec

    def _tick_reply(self, result: tick.TickResult, spec, version: str) -> pb.ScoreTickResponse:
        counts = result.counts
        valid = np.arange(spec.k)[None, :] < counts[:, None]
        if not np.isfinite(result.values[valid]).all():
            raise InvalidInput(
                "the tick's values overflow float32 (NaN or Inf): check the weights' size and the scale of the "
                "features the cached vectors came from"
            )
        reply = pb.ScoreTickResponse(
            ids=result.ids.astype("<i8", copy=False).tobytes(),
            values=tensor_proto(result.values),
            counts=counts.astype("<i4").tobytes(),
            k=spec.k,
            label_names=self.info.label_names,
            model_version=version,
        )
        if result.label_scores is not None:
            reply.label_scores.CopyFrom(tensor_proto(result.label_scores))
        if result.reverse_label_scores is not None:
            reply.reverse_label_scores.CopyFrom(tensor_proto(result.reverse_label_scores))
        return reply

    def _tick(
        self, cache, pool, rows, cols, blocked_a, blocked_b, spec, device, matrix=None, stop=None
    ) -> tick.TickResult:
        """The tick's work, off the event loop: one snapshot of `cache`'s vectors (the cache of the version
        the request resolved: never two versions' vectors in one tick), exclusions, score_tick (its
        matmuls on the backend's `device` when it has one; `matrix`: a mutual pool's working memory;
        `stop`: set when the caller has gone, so no further block starts)."""
        mutual = spec.mutual != tick.ONE_WAY
        ascending = bool((np.diff(cols) > 0).all())  # a matcher's sorted ids: the columns' order as sent
        order = None if ascending else np.argsort(cols, kind="stable")
        col_ids = cols if order is None else cols[order]
        if pool is not None:
            user_vectors, peer_vectors = cache.lookup_many([("user", rows, "pool_ids"), ("peer", rows, "pool_ids")])
            rows_user, rows_peer = user_vectors, peer_vectors
            cols_peer, cols_user = (
                (peer_vectors, user_vectors) if order is None else (peer_vectors[order], user_vectors[order])
            )
        else:
            wanted = [("user", rows, "user_ids"), ("peer", col_ids, "peer_ids")]
            if mutual:  # c(v->u): each peer's user vector and each user's peer vector
                wanted += [
                    ("user", col_ids, "peer_ids (as users, for mutual)"),
                    ("peer", rows, "user_ids (as peers, for mutual)"),
                ]
            got = cache.lookup_many(wanted)
            rows_user, cols_peer = got[0], got[1]
            cols_user, rows_peer = (got[2], got[3]) if mutual else (None, None)
        excluded = tick.exclusions(
            rows,
            col_ids,
            exclude_self=pool is not None,
            blocked_rows=blocked_a,
            blocked_cols=blocked_b,
            symmetric=pool is not None,
        )
        return tick.score_tick(
            rows,
            col_ids,
            rows_user,
            cols_peer,
            cache.label_bias,
            spec,
            rows_peer=rows_peer,
            cols_user=cols_user,
            excluded=excluded,
            pool=pool is not None,
            device=device,
            matrix=matrix,
            stop=stop,
        )


_LABEL_SPACES = {pb.ScoreTickRequest.PROBABILITY: tick.PROBABILITY, pb.ScoreTickRequest.LOGIT: tick.LOGIT}
_MUTUALS = {
    pb.ScoreTickRequest.ONE_WAY: tick.ONE_WAY,
    pb.ScoreTickRequest.PRODUCT: tick.PRODUCT,
    pb.ScoreTickRequest.MINIMUM: tick.MINIMUM,
    pb.ScoreTickRequest.HARMONIC_MEAN: tick.HARMONIC_MEAN,
}


def _score_matrix(cache, user_ids: np.ndarray, peer_ids: np.ndarray, stop: threading.Event) -> np.ndarray:
    """cache.score_matrix as Reservation.run's work (one matmul per label: it does not stop midway)."""
    return cache.score_matrix(user_ids, peer_ids)


def _blocked_pairs(request: pb.ScoreTickRequest) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The caller's blocked (user, peer) pairs as two parallel id arrays (None: none given)."""
    bound = (MAX_BLOCKED_PAIRS, "bound on blocked pairs")
    blocked_a = id_list(
        request.blocked_user_ids, request.blocked_user_ids_packed, "blocked_user_ids", *bound, required=False
    )
    blocked_b = id_list(
        request.blocked_peer_ids, request.blocked_peer_ids_packed, "blocked_peer_ids", *bound, required=False
    )
    sizes = (0 if blocked_a is None else blocked_a.size, 0 if blocked_b is None else blocked_b.size)
    if sizes[0] != sizes[1]:
        raise InvalidInput(
            f"blocked_user_ids and blocked_peer_ids are parallel lists: got {sizes[0]} and {sizes[1]} ids"
        )
    return blocked_a, blocked_b
