"""The runtime adapter between the services and the pipeline: one batcher for Score (a DynamicBatcher, or
a BatchLane where the pipeline offers one and one batch is in flight) and one DynamicBatcher per tower
(UpsertEmbeddings and the OIP tower models), each batch handed to the pipeline and its execution
recorded in the metrics. Implements service.Runtime; built by server.Server after the warm-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import numpy as np

from neuronserve.config import BatchingConfig

log = logging.getLogger(__name__)


class Runtime:
    """service.Runtime over a pipeline: one batcher for Score (a request of M peers is M rows)
    and one per tower (UpsertEmbeddings and the OIP tower models). `pipeline` needs score_requests, run_stage,
    max_batch_rows, concurrency, devices, estimate_latency_s and plan_cost_s, and may have runs_now and
    score_now (a lone request run on the loop at once) and lane and count_lane (pipeline.Pipeline has them all)."""

    def __init__(self, pipeline, batching: BatchingConfig, metrics) -> None:
        from neuronserve.batcher import DynamicBatcher
        from neuronserve.lane import INLINE_BELOW, BatchLane
        from neuronserve.contract import TOWERS, TWOTOWER

        self.pipeline = pipeline
        self.metrics = metrics
        common = dict(
            max_batch_rows=pipeline.max_batch_rows,
            config=batching,
            max_in_flight=pipeline.concurrency,
            devices=pipeline.devices,
        )
        lane = getattr(pipeline, "lane", lambda: None)() if batching.max_in_flight_batches == 1 else None
        self._scores: DynamicBatcher | BatchLane
        if lane is not None:  # batches formed and run on a thread of their own, one at a time (lane.py)
            self._scores = BatchLane(
                lane,
                max_batch_rows=pipeline.max_batch_rows,
                config=batching,
                estimate_latency_s=pipeline.estimate_latency_s,
                on_batch=self._lane_batch,
                name=TWOTOWER,
                inline_below=INLINE_BELOW,
            )
        else:
            self._scores = DynamicBatcher(
                self._run_score,
                estimate_latency_s=pipeline.estimate_latency_s,
                name=TWOTOWER,
                run_now=self._score_now if getattr(pipeline, "runs_now", False) else None,
                **common,
            )
        self.batchers: dict[str, DynamicBatcher | BatchLane] = {
            TWOTOWER: self._scores
        }  # keyed by model name, which is also each batcher's name
        self._towers: dict[str, DynamicBatcher] = {}
        for tower in TOWERS:
            self.batchers[tower] = self._towers[tower] = DynamicBatcher(
                functools.partial(self._run_tower, tower),
                estimate_latency_s=functools.partial(pipeline.plan_cost_s, tower),
                name=tower,
                **common,
            )

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def score(self, user_features: np.ndarray, peer_features: np.ndarray, deadline_s: float | None) -> np.ndarray:
        return await self._scores.submit((user_features, peer_features), peer_features.shape[0], deadline_s=deadline_s)

    async def embed(self, tower: str, features: np.ndarray, deadline_s: float | None) -> np.ndarray:
        return await self._towers[tower].submit(features, features.shape[0], deadline_s=deadline_s)

    async def _run_score(self, slices) -> np.ndarray:
        """One batch of Score requests: each request's user row and its peer rows; the pipeline
        assembles the batch on its executor thread, so the event loop only hands over the lists."""
        peers = [s.payload[1][s.start : s.stop] for s in slices]
        batch = await self.pipeline.score_requests([s.payload[0] for s in slices], peers)
        return self._counted(batch, len(slices))

    def _score_now(self, payload: tuple[np.ndarray, np.ndarray], rows: int) -> np.ndarray | None:
        """A lone Score request run on the loop at once by the pipeline (Pipeline.score_now), or None."""
        batch = self.pipeline.score_now(*payload)
        return None if batch is None else self._counted(batch, 1)

    def _lane_batch(self, batch, requests: int, on_loop: bool) -> None:
        self.pipeline.count_lane(batch, on_loop)
        self._counted(batch, requests)

    def _counted(self, batch, requests: int) -> np.ndarray:
        """A score batch's execution into the metrics; its scores."""
        self.metrics.execution(
            self._scores.name,
            rows=batch.scores.shape[0],
            requests=requests,
            compute_s=batch.compute_s,
            input_s=batch.input_s,
            output_s=batch.output_s,
        )
        return batch.scores

    async def _run_tower(self, tower: str, slices) -> np.ndarray:
        features = _concat([s.payload[s.start : s.stop] for s in slices])
        start = time.perf_counter()
        out = await self.pipeline.run_stage(tower, [features])
        self.metrics.execution(
            tower, rows=features.shape[0], requests=len(slices), compute_s=time.perf_counter() - start
        )
        return out

    async def close(self, timeout_s: float) -> None:
        """Drain every batcher (each accepted request answered); past `timeout_s`, fail what is still
        queued with UNAVAILABLE rather than wait longer."""
        draining = [asyncio.ensure_future(b.close(drain=True)) for b in self.batchers.values()]
        _, pending = await asyncio.wait(draining, timeout=max(0.0, timeout_s))
        if pending:
            if any(s.queued_requests or s.in_flight_batches for s in (b.stats() for b in self.batchers.values())):
                log.warning("grace period over with requests still queued: failing them with UNAVAILABLE")
            pending |= {asyncio.ensure_future(b.close(drain=False)) for b in self.batchers.values()}
            await asyncio.wait(pending, timeout=1.0)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
