"""The `cpu` backend: CPU-traced stages (torch.jit) run on the host, one torch thread per executor.

Below the pipeline, like the neuron backend: it loads each stage's graph at every compiled bucket and
runs only those shapes, so the CPU path exercises exactly what the device path does. The `sim`
backend wraps it for exact outputs. FUSED_STAGE loads as a CpuFusedRunner: one shape-generic graph
(loaded once, whatever the number of pairs) that still runs only the compiled (B, U) pairs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from neuronserve.artifact import Manifest
from neuronserve.contract import FUSED_STAGE
from neuronserve.backends.base import Backend, FusedRunner, StageRunner
from neuronserve.config import CoreGroup
from neuronserve.errors import BackendUnavailable
from neuronserve.model_process import ModelProcess, Setup
from neuronserve.backends.torch_launch import Fork, Step, TorchLauncher, forking


# Two executions handed to one thread: the second waits in the launcher's (or the executor's) queue and
# starts the moment the first returns, so the thread never waits for the event loop between batches (measured: the
# thread busy 92% of a perf_analyzer run at 64 in flight, against 60% with one execution at a time).
CPU_IN_FLIGHT, CPU_THREADS = 2, 1


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, manifest: Manifest, model_process: bool = False, inline_below: float = 0.0) -> None:
        """model_process: the fused graph runs in a process of its own per core group (model_process.py);
        inline_below: the event loop's load under which a batch runs on it (torch_launch.TorchLauncher;
        0: never; the server passes ServerConfig.inline_below)."""
        if manifest.target != "cpu":
            raise BackendUnavailable(
                f"artifact {manifest.directory} was compiled for {manifest.target}; the cpu backend runs --target cpu artifacts "
                "(recompile with `neuronserve compile --target cpu`)"
            )
        super().__init__(manifest)
        # One thread per execution: the pipeline runs one executor thread per core group, and on a small
        # host intra-op threads of concurrent executions would only fight over the same cores.
        torch.set_num_threads(1)
        self.model_process = model_process
        self.inline_below = inline_below
        # Each file loaded once and shared by every core group (a TorchScript module runs concurrently
        # on several threads): torch.jit.load holds the GIL, so a version loading beside served traffic
        # stalls the event loop for each file it loads.
        self._graphs: dict[str, torch.jit.ScriptModule] = {}
        self._graphs_lock = threading.Lock()

    def graph(self, file: str) -> torch.jit.ScriptModule:
        with self._graphs_lock:
            if file not in self._graphs:
                # the bytes whose sha256 was checked, not the path again (artifact.Manifest.file_bytes)
                self._graphs[file] = torch.jit.load(self.manifest.file_stream(file), map_location="cpu")
            return self._graphs[file]

    def close(self) -> None:
        with self._graphs_lock:
            self._graphs.clear()
        super().close()

    def load(self, stage: str, cores: CoreGroup) -> CpuRunner | CpuFusedRunner:
        spec = self.manifest.stage(stage)
        graph = self.graph

        if stage == FUSED_STAGE:
            pairs = {(b.batch_size, int(b.user_batch_size or 0)): graph(b.file) for b in spec.buckets}
            shapes = tuple(tuple(t.shape[1:]) for t in spec.inputs[:2])
            process = self._model_process(spec, shapes, cores) if self.model_process else None
            return CpuFusedRunner(cores, pairs, shapes, process, self.inline_below)
        graphs = {b.batch_size: graph(b.file) for b in spec.buckets}
        shapes = tuple(tuple(t.shape[1:]) for t in spec.inputs)
        return CpuRunner(stage, cores, graphs, shapes)

    def _model_process(self, spec, shapes, cores: CoreGroup) -> ModelProcess:
        """The fused graph's process for one core group, started (blocking until it is warm). A slot
        holds a job of twice the largest bucket's rows (a batch of the largest bucket, plus padding)."""
        (user_features,), (peer_features,) = shapes
        labels = int(spec.outputs[0].shape[-1])
        largest = max(b.batch_size for b in spec.buckets)
        row_bytes = 4 * (user_features + peer_features + labels) + 8
        setup = Setup(
            files={b.file: self.manifest.file_bytes(b.file) for b in spec.buckets},
            pairs={(b.batch_size, b.user_batch_size): b.file for b in spec.buckets},
            user_features=user_features,
            peer_features=peer_features,
            labels=labels,
        )
        process = ModelProcess(setup, CPU_IN_FLIGHT, 2 * largest * row_bytes + 8 * 64 * 4, name=f"model-{cores}")
        process.start()
        return process


class CpuRunner(StageRunner):
    max_in_flight, threads = CPU_IN_FLIGHT, CPU_THREADS

    def __init__(
        self,
        stage: str,
        cores: CoreGroup,
        graphs: dict[int, torch.jit.ScriptModule],
        shapes: tuple[tuple[int, ...], ...],
    ) -> None:
        self.stage = stage
        self.cores = cores
        self.batch_sizes = tuple(sorted(graphs))
        self._graphs = graphs
        self._shapes = shapes
        self.any_rows = one_graph(graphs)

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    def warmup(self) -> None:
        for batch in warm_keys(self._graphs):
            self.run([np.zeros((batch,) + shape, dtype=np.float32) for shape in self._shapes])

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch = self.check_inputs(inputs)
        graph = self._graphs[self.batch_sizes[-1] if self.any_rows else batch]  # any_rows: the one graph
        tensors = [as_tensor(x) for x in inputs]
        with torch.inference_mode():
            out = graph(*tensors)
        return out.numpy()


def one_graph(graphs: dict) -> bool:
    """True when every compiled shape is served by one graph (a cpu artifact's one file per stage, traced
    once and parity-checked at every bucket by compile): a shape-generic graph, run at exact rows."""
    return len({id(graph) for graph in graphs.values()}) == 1


def warm_keys(graphs: dict) -> list:
    """The shapes a warm-up runs: each distinct graph twice at its smallest shape, then once at its
    second smallest. TorchScript's profiling executor profiles a graph's first call and optimizes at its
    second, whatever the shapes (a shape-generic graph is then as fast at every bucket), so running every
    bucket of a one-file stage would only take CPU from the traffic a new version loads beside."""
    by_graph: dict[int, list] = {}
    for key in sorted(graphs):
        by_graph.setdefault(id(graphs[key]), []).append(key)
    return [key for keys in by_graph.values() for key in [keys[0], *keys[:2]]]


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """The array as a tensor sharing its memory (a copy only when it is read-only)."""
    # torch wants writable memory; a request's rows may be a read-only view of the message bytes.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class CpuFusedRunner(FusedRunner):
    """FUSED_STAGE on the host: one TorchScript call per batch, the user gather inside the graph. The
    pipeline's batches go to the model process when there is one, else to torch's inter-op threads
    (torch_launch.py: no Python thread per execution)."""

    max_in_flight, threads = CPU_IN_FLIGHT, CPU_THREADS

    def __init__(
        self,
        cores: CoreGroup,
        graphs: dict[tuple[int, int], torch.jit.ScriptModule],
        shapes: Sequence[tuple[int, ...]],
        process: ModelProcess | None = None,
        inline_below: float = 0.0,
    ) -> None:
        super().__init__(cores, graphs, shapes)
        self._graphs = graphs  # (B, U) -> graph: warm-up, timing, and jobs too large for the process's slots
        self.process = process  # the pipeline's batches go here when set (submit)
        self._forks: dict[tuple[int, int], Fork] = {}  # (B, U) -> its graph's launch, without a process
        if process is None:  # one forking wrapper per distinct graph: a shape-generic file serves every pair
            distinct = {id(graph): graph for graph in graphs.values()}  # scripted once each, not once per key
            forks = {key: forking(graph) for key, graph in distinct.items()}
            self._forks = {key: forks[id(graph)] for key, graph in graphs.items()}
        self._launcher = TorchLauncher(inline_below=inline_below)
        self.any_rows = process is None and one_graph(graphs)
        self._any = next(iter(graphs))  # the key every exact shape runs with when any_rows
        self.runs_now = self.any_rows and inline_below > 0
        self.lane = self.any_rows and inline_below == 0  # threaded only: a BatchLane's thread runs the graph

    def submit(self, chunks: Sequence[tuple[Sequence[np.ndarray], int]]):
        """On the loop: the batch's padded chunks ([user, peer, index], rows) -> an asyncio future of
        (scores, busy seconds), from the model process or torch's inter-op threads; None when the
        process's slot cannot hold them (the pipeline's executor runs them)."""
        if self.process is not None:
            if not self.process.fits(chunks):
                return None
            for arrays, _ in chunks:
                self.check_inputs(arrays)
            return self.process.submit(chunks)
        steps = []
        for arrays, rows in chunks:
            key = self._key(arrays)
            steps.append(Step(self._forks[key], tuple(as_tensor(x) for x in arrays), rows, self._graphs[key]))
        return self._launcher.submit(steps)

    def score_now(self, user: np.ndarray, peer: np.ndarray) -> tuple[np.ndarray, float] | None:
        """On the loop, at low load: the request's execution inline (TorchLauncher.run_now) at its exact
        rows, without a batch's assembly; None when the launcher hands executions to its thread."""
        if not self.runs_now or user.dtype != np.float32 or peer.dtype != np.float32:
            return None
        rows = peer.shape[0]
        index = torch.zeros(rows, dtype=torch.int64)  # every peer row meets the one user
        inputs = (as_tensor(np.ascontiguousarray(user)), as_tensor(np.ascontiguousarray(peer)), index)
        return self._launcher.run_now(self._graphs[self._any], inputs, rows)

    def healthy(self) -> bool:
        return self.process is None or self.process.alive

    def close(self) -> None:
        self._launcher.close()
        if self.process is not None:
            self.process.close()

    def warmup(self) -> None:
        for batch, users in warm_keys(self._graphs):
            self.run(self.zero_inputs(batch, users))

    def _key(self, inputs: Sequence[np.ndarray]) -> tuple[int, int]:
        """The checked inputs' (B, U) graph key (any_rows: the one graph's)."""
        key = self.check_inputs(inputs)
        return self._any if self.any_rows else key

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        graph = self._graphs[self._key(inputs)]
        user, peer, index = (as_tensor(x) for x in inputs)
        with torch.inference_mode():
            out = graph(user, peer, index)
        return out.numpy()
