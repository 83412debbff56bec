"""The .proto sources and their generated modules (built from the sources, never hand-edited).

The *_pb2 and *_pb2_grpc modules are generated when the package is built (setup.py's build_py hook:
`pip install .`, a wheel, or the editable `pip install -e .` that ./run.sh does), never at import or
at run time, so an installation may be read-only. They import on protobuf 3.19.5 (AWS's Inf1 image)
through the current release, and on grpcio >= 1.48. After editing a .proto, reinstall (./run.sh does
when a .proto is newer than its install).

Import them as submodules: `from neuronserve.protos import scorer_pb2, scorer_pb2_grpc`. They are
not imported eagerly: open_inference_pb2 defines package `inference`, as tritonclient's own
generated code does, and protobuf refuses both in one process.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def __getattr__(name: str):
    """`from neuronserve.protos import X_pb2` when X_pb2.py was never generated: say how to get it."""
    if name.endswith(("_pb2", "_pb2_grpc")) and (_HERE / f"{name.split('_pb2')[0]}.proto").exists():
        if not (_HERE / f"{name}.py").exists():
            raise ImportError(
                f"{__name__}.{name} is generated when the package is built and is missing here ({_HERE}): "
                "install the package (`pip install .`, or `pip install -e .` in a checkout, as ./run.sh does)"
            )
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
