"""The compilation stage (installed as neuronserve.compile): the two-tower model, tracing per target, parity check.

`compile_artifact` is the entry point; `neuronserve compile` and `neuronserve inspect` are its CLI.
The runtime never imports this package (except the demo bootstrap of `neuronserve serve`).
"""

from neuronserve.compile.build import DEFAULT_BATCH_SIZES, compile_artifact

__all__ = ["DEFAULT_BATCH_SIZES", "compile_artifact"]
