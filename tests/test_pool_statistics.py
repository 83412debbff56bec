"""A pool's OIP ModelStatistics carried over a worker's restart: the counts never step down."""

from __future__ import annotations

import os
import signal
import time

from neuronserve.pool_carry import PUBLISH_S, CarriedStatistics, StatisticsSlots
from neuronserve.pool_stats import WORKER_SCOPE
from neuronserve.protos import open_inference_pb2 as oip
from test_workers import counters, model_stats, poll, pools, score, serve_argv, shared_address, statistics  # noqa: F401 - pools is a fixture


def test_a_slot_keeps_the_last_committed_snapshot_and_a_new_worker_adds_it_to_its_models():
    slots = StatisticsSlots(workers=2)
    assert CarriedStatistics(slots, 0).carried == oip.ModelStatisticsResponse()  # a place never used
    first = oip.ModelStatisticsResponse(model_stats=[model_stats("twotower", 3, 300, last=2000), model_stats("user_tower", 2, 9, last=5)])
    slots.write(0, first.SerializeToString())
    slots.write(0, b"\xff" * (64 << 20))  # too large: kept out, the committed one stands
    carried = CarriedStatistics(slots, 0)
    assert carried.carried == first and CarriedStatistics(slots, 1).carried == oip.ModelStatisticsResponse()
    reply = oip.ModelStatisticsResponse(model_stats=[model_stats("twotower", 4, 50, last=3000)])
    carried.add_to(reply)  # only the models the reply holds
    (twotower,) = reply.model_stats
    assert (twotower.inference_count, twotower.last_inference) == (7, 3000)


def test_a_restarted_workers_counts_are_carried_into_the_pools_statistics(pools, small_artifact):
    pool = pools(serve_argv(small_artifact))
    pool.ready()
    workers = pool.workers()
    score(workers[1].address, calls=6)
    own = statistics(workers[1].address, scope=(WORKER_SCOPE,))
    assert own.inference_count >= 6
    before = counters(statistics(shared_address(pool)))
    published = time.monotonic() + 4 * PUBLISH_S  # the worker writes its counts every PUBLISH_S (the loss bound); 4: a late loop
    poll(lambda: time.monotonic() > published, 10, lambda: "")
    os.kill(workers[1].pid, signal.SIGKILL)
    pool.wait_for(rf"worker 1 ready: pid (?!{workers[1].pid}\b)")
    restarted = pool.workers()[1]
    assert counters(statistics(restarted.address, scope=(WORKER_SCOPE,))) == counters(own)  # carried, not lost
    assert counters(statistics(shared_address(pool))) == before
    score(restarted.address, calls=2)
    assert statistics(shared_address(pool)).inference_count == before["inference_count"] + 2
