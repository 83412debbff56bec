"""The compilation stage (installed as neuronserve.compile): the two-tower model, tracing per target, parity check.

`compile_artifact` is the entry point; `neuronserve compile` and `neuronserve inspect` are its CLI.
The runtime never imports this package (except the demo bootstrap of `neuronserve serve`).
"""

__all__ = ["DEFAULT_BATCH_SIZES", "compile_artifact"]


def __getattr__(name: str):
    """Import build (and torch) on first use, so `neuronserve --help` and `serve` stay light."""
    if name in __all__:
        from neuronserve.compile import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
