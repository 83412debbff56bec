"""The one Backend interface: load a stage on a core group, run a batch at a compiled bucket.

The pipeline (above) calls a runner from the executor thread that owns its core group; everything
below (torch, torch-neuron, the simulated device) stays behind this interface. A runner is a
StageRunner (one of the three pipelining stages) or, for FUSED_STAGE, a FusedRunner (the whole
scorer in one execution per batch: user rows plus a user index in, scores out).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import numpy as np

from neuronserve.artifact import Manifest
from neuronserve.contract import FUSED_STAGE
from neuronserve.config import CoreGroup
from neuronserve.errors import InvalidInput
from neuronserve.tick_device import TickDevice


class Runner(ABC):
    """What every runner has: a graph (per compiled shape) loaded on one core group.

    `run` is blocking and is called from the group's executor threads: `threads` of them (None: one
    per execution in flight), at most `max_in_flight` executions handed to them at once (1, or N for a
    graph compiled with --neuroncore-pipeline-cores N), so with fewer threads than executions the next
    one waits in the executor's queue and starts the moment a thread frees. Any input shape that was
    not compiled is an InvalidInput error, as on the device, unless `any_rows`: a host graph traced
    once for every bucket runs any row count >= 1, so the pipeline sends it exact rows, unpadded.
    Returns a float32 array.
    """

    stage: str
    cores: CoreGroup
    batch_sizes: tuple[int, ...]
    max_in_flight: int = 1
    threads: int | None = None
    any_rows: bool = False

    @abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray: ...

    @abstractmethod
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per (feature) input, the shape without the batch dimension."""

    @abstractmethod
    def warmup(self) -> None:
        """Run every compiled shape once on zeros (loads the graphs onto the core)."""

    def _compiled(self, batch_size: int) -> bool:
        return batch_size >= 1 if self.any_rows else batch_size in self.batch_sizes

    def healthy(self) -> bool:
        """False while the core group is out of rotation (faulted, resetting): the pipeline routes around it."""
        return True

    def close(self) -> None:  # noqa: B027 -- an optional hook: runners that hold something override it
        """Release the core group (default: nothing to release)."""


class StageRunner(Runner):
    """One traced stage loaded on one core group, at every compiled bucket.

    Inputs are C-contiguous float32 arrays whose first dimension is exactly one of `batch_sizes`.
    """

    def warmup(self) -> None:
        """Run every bucket once on zeros (loads the graph onto the core)."""
        spec_shapes = self.input_shapes()
        for batch in self.batch_sizes:
            self.run([np.zeros((batch,) + shape, dtype=np.float32) for shape in spec_shapes])

    def check_inputs(self, inputs: Sequence[np.ndarray]) -> int:
        """The batch size, after checking `inputs` are compiled shapes (as the device requires): one
        C-contiguous float32 array per input, the same batch B for all, B one of `batch_sizes`."""
        shapes = self.input_shapes()
        if len(inputs) != len(shapes):
            raise InvalidInput(f"{self.stage} takes {len(shapes)} input(s), got {len(inputs)}")
        batch_size = inputs[0].shape[0] if inputs[0].ndim else -1
        for i, (array, shape) in enumerate(zip(inputs, shapes, strict=False)):
            if array.dtype != np.float32 or not array.flags.c_contiguous:
                raise InvalidInput(f"{self.stage} input {i} must be a C-contiguous float32 array, got {array.dtype}")
            if array.shape != (batch_size,) + tuple(shape) or not self._compiled(batch_size):
                raise InvalidInput(
                    f"{self.stage} input {i} has shape {tuple(array.shape)}; the device runs only compiled shapes "
                    f"(B, {', '.join(map(str, shape))}) with B in {list(self.batch_sizes)}, the same B for every input"
                )
        return batch_size

    def latency_s(self, batch_size: int) -> float | None:
        """Expected seconds of one execution at `batch_size` (a bucket) if the backend models its device
        (sim); None: unknown, and the pipeline times one run per bucket at start-up instead."""
        return None


class FusedRunner(Runner):
    """FUSED_STAGE on one core group: the whole scorer, one execution per batch.

    run([user_features [U, F_u] float32, peer_features [B, F_p] float32, user_index [B] int64]) ->
    scores [B, K] float32 logits, row i scoring user user_index[i] against peer i; the same as
    user_tower -> take(user_index) -> pair_scorer, with the gather inside the graph. Only compiled
    (B, U) pairs run (`pairs`; B in `batch_sizes`, U in `user_batch_sizes(B)`), index values in
    [0, U); anything else is InvalidInput. Subclasses set the graphs and implement `run`, calling
    `check_inputs` first; a wrapper (the sim) passes its inner runner's `pairs` and `input_shapes()`.
    """

    stage = FUSED_STAGE
    runs_now = False  # True where score_now can run a request on the calling thread (the cpu backend's)
    lane = False  # True where batches should form and run on a host thread of their own (lane.py; cpu)

    def __init__(self, cores: CoreGroup, pairs: Iterable[tuple[int, int]], shapes: Sequence[tuple[int, ...]]) -> None:
        self.cores = cores
        self.pairs: tuple[tuple[int, int], ...] = tuple(
            sorted(set((int(b), int(u)) for b, u in pairs))
        )  # (B, U), ascending
        if not self.pairs:
            raise ValueError(f"{FUSED_STAGE} needs at least one compiled (batch, user batch) pair")
        self.batch_sizes = tuple(sorted({b for b, _ in self.pairs}))
        self._users: dict[int, tuple[int, ...]] = {
            b: tuple(u for bb, u in self.pairs if bb == b) for b in self.batch_sizes
        }
        user_shape, peer_shape = (tuple(int(d) for d in shape) for shape in shapes)
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] = (user_shape, peer_shape)

    def score_now(self, user: np.ndarray, peer: np.ndarray) -> tuple[np.ndarray, float] | None:
        """One request's scores (user [1, F_u], peer [rows, F_p], checked by the service) and busy seconds,
        run on the calling thread if this runner can now; None: run it as a batch (run or submit)."""
        return None

    def user_batch_sizes(self, batch_size: int) -> tuple[int, ...]:
        """The user batches U compiled with peer batch `batch_size`, ascending (empty if it is not a bucket)."""
        return self._users.get(batch_size, ())

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """(user feature shape (F_u,), peer feature shape (F_p,)); the user index is [B] int64."""
        return self._shapes

    def latency_s(self, batch_size: int, user_batch_size: int) -> float | None:
        """Expected seconds of one execution at (B, U) if the backend models its device; None: unknown
        (the pipeline times it)."""
        return None

    def warmup(self) -> None:
        """Run every compiled (B, U) pair once on zeros."""
        for batch, users in self.pairs:
            self.run(self.zero_inputs(batch, users))

    def zero_inputs(self, batch_size: int, user_batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Valid inputs of zeros at (B, U): for warm-up and timing."""
        user_shape, peer_shape = self._shapes
        return (
            np.zeros((user_batch_size,) + user_shape, dtype=np.float32),
            np.zeros((batch_size,) + peer_shape, dtype=np.float32),
            np.zeros((batch_size,), dtype=np.int64),
        )

    def check_inputs(self, inputs: Sequence[np.ndarray]) -> tuple[int, int]:
        """(B, U), after checking `inputs` are a compiled shape (as the device requires) and every
        user index is in [0, U) (the device would read past the user rows, not fail)."""
        if len(inputs) != 3:
            raise InvalidInput(
                f"{self.stage} takes 3 inputs (user_features, peer_features, user_index), got {len(inputs)}"
            )
        user, peer, index = inputs
        for i, (array, dtype) in enumerate(((user, np.float32), (peer, np.float32), (index, np.int64))):
            if not isinstance(array, np.ndarray) or array.dtype != dtype or not array.flags.c_contiguous:
                got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise InvalidInput(
                    f"{self.stage} input {i} must be a C-contiguous {np.dtype(dtype).name} array, got {got}"
                )
        users = user.shape[0] if user.ndim else -1
        batch = peer.shape[0] if peer.ndim else -1
        user_shape, peer_shape = self._shapes
        if (
            user.shape != (users,) + user_shape
            or peer.shape != (batch,) + peer_shape
            or index.shape != (batch,)
            or not ((users >= 1 and batch >= 1) if self.any_rows else users in self.user_batch_sizes(batch))
        ):
            raise InvalidInput(
                f"{self.stage} inputs have shapes {tuple(user.shape)}, {tuple(peer.shape)}, {tuple(index.shape)}; the device runs only "
                f"compiled shapes (U, {', '.join(map(str, user_shape))}), (B, {', '.join(map(str, peer_shape))}), (B,) "
                f"with (B, U) in {list(self.pairs)}"
            )
        if batch and (int(index.min()) < 0 or int(index.max()) >= users):
            raise InvalidInput(
                f"{self.stage} user_index values must be in [0, {users}) (the user rows), got {int(index.min())}..{int(index.max())}"
            )
        return batch, users


class Backend(ABC):
    """A way to run an artifact's stages: cpu (torch.jit), neuron (torch-neuron), sim (simulated cores)."""

    name: str

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    @abstractmethod
    def load(self, stage: str, cores: CoreGroup) -> StageRunner | FusedRunner:
        """Load `stage` at every compiled bucket onto `cores`: a StageRunner for the three stages, a
        FusedRunner for FUSED_STAGE (an ArtifactError if the artifact predates it: serve three stages)."""

    def tick_device(self) -> TickDevice | None:
        """Where ScoreTick's matmuls run (tick_device.TickDevice); None: on the host (docs/tick.md)."""
        return None

    def close(self) -> None:  # noqa: B027 -- an optional hook, as Runner.close
        """Release everything the backend holds."""
