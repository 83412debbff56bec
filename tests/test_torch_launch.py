"""TorchLauncher: a core group's executions on torch's inter-op threads (neuronserve/backends/torch_launch.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from neuronserve.backends.torch_launch import Fork, Step, TorchLauncher, forking
from neuronserve.errors import Unavailable


class _Graph(torch.nn.Module):
    """Row i: peer[i] * 2 + sum(user[index[i]]); index_select fails on an index past the user rows."""

    def forward(self, user: torch.Tensor, peer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return peer * 2 + user.index_select(0, index).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def fork() -> Fork:
    return forking(torch.jit.script(_Graph()))


def _step(fork, rows: int, bucket: int, seed: int, index_offset: int = 0) -> tuple[Step, np.ndarray]:
    """A step of `bucket` padded rows keeping `rows`, and the expected output rows."""
    rng = np.random.default_rng(seed)
    user = rng.standard_normal((2, 3)).astype(np.float32)
    peer = rng.standard_normal((bucket, 3)).astype(np.float32)
    index = (np.arange(bucket) % 2 + index_offset).astype(np.int64)
    expected = peer * 2 + user.sum(1, keepdims=True)[index % 2]
    tensors = (torch.from_numpy(user), torch.from_numpy(peer), torch.from_numpy(index))
    return Step(fork, tensors, rows), expected[:rows]


def test_a_submission_returns_its_steps_rows_in_order(fork):
    async def main():
        launcher = TorchLauncher()
        (a, want_a), (b, want_b) = _step(fork, 3, 8, seed=1), _step(fork, 8, 8, seed=2)
        out, busy_s = await launcher.submit([a, b])
        launcher.close()
        return out, busy_s, np.concatenate([want_a, want_b])

    out, busy_s, want = asyncio.run(main())
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert out.shape == (11, 3) and busy_s > 0


def test_submissions_complete_in_the_order_they_were_made(fork):
    async def main():
        launcher = TorchLauncher()
        finished: list[int] = []
        futures = [launcher.submit([_step(fork, 64, 64, seed=i)[0]]) for i in range(6)]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: finished.append(i))
        await asyncio.gather(*futures)
        launcher.close()
        return finished

    assert asyncio.run(main()) == list(range(6))


def test_a_failing_execution_fails_its_own_submission_only(fork):
    async def main():
        launcher = TorchLauncher()
        good, want = _step(fork, 4, 4, seed=3)
        bad, _ = _step(fork, 4, 4, seed=4, index_offset=5)  # index past the 2 user rows: index_select raises
        results = await asyncio.gather(
            launcher.submit([good]), launcher.submit([good, bad]), launcher.submit([good]), return_exceptions=True
        )
        launcher.close()
        return results, want

    (first, failed, last), want = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and "index" in str(failed).lower()
    np.testing.assert_allclose(first[0], want, rtol=1e-6)
    np.testing.assert_allclose(last[0], want, rtol=1e-6)


def test_close_waits_for_queued_work_then_refuses(fork):
    async def main():
        launcher = TorchLauncher()
        futures = [launcher.submit([_step(fork, 256, 256, seed=i)[0]]) for i in range(4)]
        await asyncio.to_thread(launcher.close)  # off the loop: the settles are queued on it meanwhile
        assert not launcher._running  # every execution ended before close returned
        with pytest.raises(Unavailable, match="closed"):
            launcher.submit([_step(fork, 1, 1, seed=9)[0]])
        return await asyncio.gather(*futures)

    assert len(asyncio.run(main())) == 4


def test_busy_seconds_come_from_the_injected_clock(fork):
    ticks = iter(range(0, 100, 5))  # each reading 5 s after the one before: a start and an end per step

    async def main():
        launcher = TorchLauncher(clock=lambda: float(next(ticks)))
        _, busy_s = await launcher.submit([_step(fork, 2, 2, seed=5)[0], _step(fork, 2, 2, seed=6)[0]])
        launcher.close()
        return busy_s

    assert asyncio.run(main()) == 10.0
