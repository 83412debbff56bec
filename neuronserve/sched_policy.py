"""The Linux scheduling policy of a serving process's threads (`--sched-policy`, docs/workers.md).

Under SCHED_BATCH a woken thread does not preempt the running one; it runs when that one's slice ends or
it blocks. Priority and CPU share are unchanged. A serving process (one process, or each pool worker) sets
the policy on its first thread before it starts any other, so the event loop's, gRPC's and its own threads
inherit it. Torch's inter-op threads run the cpu launcher's executions and wake the loop when one completes:
they put themselves back under the default policy (`--sched-policy` measured: docs/benchmarks.md, 2026-12-05,
fourteenth session).
"""

from __future__ import annotations

import os

POLICIES = ("batch", "normal")


def use_policy(policy: str) -> None:
    """Put the calling thread, and the threads it starts from now on, under `policy` (one of POLICIES).
    Does nothing where the OS has no such policy (not Linux)."""
    code = getattr(os, "SCHED_BATCH" if policy == "batch" else "SCHED_OTHER", None)
    if code is not None and hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, code, os.sched_param(0))
