"""What runs on a core group's executor thread: a batch's chunks through a stage's runner, each padded
to its compiled bucket, timed; and the typed result a job hands back to the pipeline on the loop.

Chunks are (rows, bucket) pairs in row order (pipeline._chunks plans them); padding rows never leave
this module and the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from neuronserve.backends.base import Runner, StageRunner
from neuronserve.contract import FUSED_STAGE, PAIR_SCORER, PEER_TOWER, USER_TOWER

Chunks = Sequence[tuple[int, int]]  # (caller rows, compiled bucket) per execution, in row order


@dataclass(frozen=True)
class Execution:
    """One device execution: `rows` caller rows of `stage` padded to `bucket`."""

    stage: str
    rows: int
    bucket: int


@dataclass(frozen=True)
class ScoredBatch:
    """A score batch's logits [rows, K] and where its time went, in seconds (Triton's statistics)."""

    scores: np.ndarray
    input_s: float  # assembling and padding the inputs
    compute_s: float  # from the hand-off to the core until its outputs were back
    output_s: float  # unpadding and the NaN/Inf marking
    job: JobResult | None = None  # the executions, when the batch ran on the calling thread (score_fused)


@dataclass(frozen=True)
class JobResult:
    """A job's unpadded output, the seconds its runner was busy, and its executions."""

    out: np.ndarray
    busy_s: float
    executions: tuple[Execution, ...]


def executions(stage: str, chunks: Chunks) -> tuple[Execution, ...]:
    return tuple(Execution(stage, rows, bucket) for rows, bucket in chunks)


def run_fused(runners: dict[str, Runner], inputs: Sequence[list[np.ndarray]], chunks: Chunks) -> JobResult:
    """Blocking: one fused execution per chunk of already padded inputs."""
    outs, busy_s = [], 0.0
    for chunk, (rows, _) in zip(inputs, chunks, strict=True):
        out, seconds = timed_run(runners[FUSED_STAGE], chunk)
        outs.append(out[:rows])
        busy_s += seconds
    return JobResult(concat(outs), busy_s, executions(FUSED_STAGE, chunks))


def score_fused(
    runners: dict[str, Runner],
    users: Sequence[np.ndarray],
    peers: Sequence[np.ndarray],
    chunks_of: Callable[[int], Chunks],
    user_rows: Callable[[int, int], int],
) -> ScoredBatch:
    """Blocking, on the calling thread: a batch of score requests (users[i] [1, F_u] against peers[i]
    [m_i, F_p]) assembled, run (one fused execution per chunk of `chunks_of(rows)`) and NaN-marked."""
    start_s = time.perf_counter()
    user, user_index = concat(users), user_rows_of(peers)
    chunks = chunks_of(user_index.shape[0])
    peer, inputs = fused_inputs(user, peers, user_index, chunks, user_rows)
    sent_s = time.perf_counter()
    job = run_fused(runners, inputs, chunks)
    back_s = time.perf_counter()
    scores = mark_nonfinite(job.out, user, peer, user_index)
    return ScoredBatch(scores, sent_s - start_s, back_s - sent_s, time.perf_counter() - back_s, job)


def remote_fused(inputs: Sequence[list[np.ndarray]], chunks: Chunks, runners: dict[str, Runner]):
    """run_fused's job sent to the group's model process, when its runner has one (cpu backend):
    (an asyncio future of (unpadded scores, busy seconds), executions); None to use the executor."""
    submit = getattr(runners[FUSED_STAGE], "submit", None)
    if submit is None:
        return None
    done = submit([(chunk, rows) for chunk, (rows, _) in zip(inputs, chunks, strict=True)])
    return None if done is None else (done, executions(FUSED_STAGE, chunks))


def run_chunks(runner: StageRunner, arrays: Sequence[np.ndarray], chunks: Chunks) -> JobResult:
    """Blocking: one execution per chunk over the rows of `arrays` in order, each padded with zero rows."""
    outs, busy_s = [], 0.0
    for start, (rows, bucket) in zip(chunk_starts(chunks), chunks, strict=True):
        out, seconds = timed_run(runner, [padded(array[start : start + rows], bucket) for array in arrays])
        outs.append(out[:rows])
        busy_s += seconds
    return JobResult(concat(outs), busy_s, executions(runner.stage, chunks))


def run_stages(
    runners: dict[str, StageRunner],
    chunks_of: Callable[[str, int], Chunks],
    user: np.ndarray,
    peer: np.ndarray,
    user_index: np.ndarray,
) -> JobResult:
    """Blocking: the three stages one after another on one group (the data-parallel path without the
    fused graph); `chunks_of(stage, rows)` plans each stage's chunks."""
    u = run_chunks(runners[USER_TOWER], [user], chunks_of(USER_TOWER, user.shape[0]))
    p = run_chunks(runners[PEER_TOWER], [peer], chunks_of(PEER_TOWER, peer.shape[0]))
    pairs = [np.take(u.out, user_index, axis=0), p.out]
    scores = run_chunks(runners[PAIR_SCORER], pairs, chunks_of(PAIR_SCORER, peer.shape[0]))
    return JobResult(scores.out, u.busy_s + p.busy_s + scores.busy_s, u.executions + p.executions + scores.executions)


def chunk_starts(chunks: Chunks) -> list[int]:
    """The first row of each chunk."""
    return [sum(rows for rows, _ in chunks[:i]) for i in range(len(chunks))]


def concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def padded(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` as a C-contiguous float32 array of `rows` rows, zero rows after its own (no copy if it is one)."""
    if array.shape[0] == rows:
        return np.ascontiguousarray(array, dtype=np.float32)
    out = np.zeros((rows,) + array.shape[1:], dtype=np.float32)
    out[: array.shape[0]] = array
    return out


def user_rows_of(peers: Sequence[np.ndarray]) -> np.ndarray:
    """Request i's user row index (i) for each of its peer rows, over a batch's requests in order."""
    if len(peers) == 1:
        return np.zeros(peers[0].shape[0], dtype=np.int64)
    return np.repeat(np.arange(len(peers), dtype=np.int64), [p.shape[0] for p in peers])


def mark_nonfinite(scores: np.ndarray, user: np.ndarray, peer: np.ndarray, user_index: np.ndarray | None) -> np.ndarray:
    """Scores with NaN in every row whose user or peer features are not all finite (NaN, Inf), so the
    service, which checks only the output, refuses exactly those requests (a model can map an Inf input
    to a finite score). One vectorised check per batch; per row only if it fails. user_index None: every
    row meets user row 0 (one request)."""
    if np.isfinite(peer).all() and np.isfinite(user).all():
        return scores
    bad_user = ~np.isfinite(user).all(axis=1)
    bad = ~np.isfinite(peer).all(axis=1) | (bad_user[0] if user_index is None else bad_user[user_index])
    scores = np.array(scores, dtype=np.float32)
    scores[bad] = np.nan
    return scores


def timed_run(runner: Runner, inputs: list[np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = runner.run(inputs)
    return out, time.perf_counter() - start


def call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """loop.call_soon_threadsafe(callback, *args) from an executor thread; nothing once the loop is closed
    (a job that outlived its server)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def fused_inputs(
    user: np.ndarray,
    peers: Sequence[np.ndarray],
    user_index: np.ndarray,
    chunks: Chunks,
    user_rows: Callable[[int, int], int],
) -> tuple[np.ndarray, list[list[np.ndarray]]]:
    """(the peer rows, per chunk [users padded to a user bucket, peers padded to the bucket, index];
    exact rows when the graph runs any rows; `user_rows(bucket, users)`: a chunk's user rows). One chunk
    (the usual case): every user, the peers copied once straight into the input, and the batch's own
    user index (padded only past the rows)."""
    if len(chunks) == 1:
        rows, bucket = chunks[0]
        padded_peer = np.empty((bucket, peers[0].shape[1]), dtype=np.float32)
        np.concatenate(peers, axis=0, out=padded_peer[:rows])
        padded_peer[rows:] = 0
        index = user_index if rows == bucket else np.concatenate([user_index, np.zeros(bucket - rows, np.int64)])
        return padded_peer[:rows], [[padded(user, user_rows(bucket, user.shape[0])), padded_peer, index]]
    peer = concat(peers)
    peer_inputs = [
        padded(peer[start : start + rows], bucket)
        for start, (rows, bucket) in zip(chunk_starts(chunks), chunks, strict=False)
    ]
    inputs = []
    for start, (rows, bucket), peer_input in zip(chunk_starts(chunks), chunks, peer_inputs, strict=True):
        first, last = int(user_index[start]), int(user_index[start + rows - 1])
        index = np.zeros(bucket, dtype=np.int64)
        index[:rows] = user_index[start : start + rows] - first
        inputs.append([padded(user[first : last + 1], user_rows(bucket, last + 1 - first)), peer_input, index])
    return peer, inputs
