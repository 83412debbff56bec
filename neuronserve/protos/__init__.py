"""The .proto sources and their generated modules (built from the sources, never hand-edited).

The generated *_pb2 modules are produced by grpc_tools.protoc on first import when they are
missing or older than their .proto, so a fresh clone (or a regular install) needs no build step.
Import them as submodules: `from neuronserve.protos import scorer_pb2, scorer_pb2_grpc`. They are
not imported eagerly: open_inference_pb2 defines package `inference`, as tritonclient's own
generated code does, and protobuf refuses both in one process.
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_PROTOS = ("scorer", "open_inference")


def _stale(name: str) -> bool:
    source = _HERE / f"{name}.proto"
    outputs = [_HERE / f"{name}_pb2.py", _HERE / f"{name}_pb2_grpc.py"]
    return any(not out.exists() or out.stat().st_mtime < source.stat().st_mtime for out in outputs)


def _generate() -> None:
    from grpc_tools import protoc  # build-time tool, only needed when the sources changed

    import grpc_tools

    root = _HERE.parent.parent  # so generated code imports `neuronserve.protos.X_pb2`
    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    for name in _PROTOS:
        if not _stale(name):
            continue
        rel = (_HERE / f"{name}.proto").relative_to(root)
        tmp_out = _HERE / f".gen-{os.getpid()}"
        tmp_out.mkdir(exist_ok=True)
        code = protoc.main(
            ["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp_out}", f"--grpc_python_out={tmp_out}", str(rel)]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {rel} (exit {code})")
        generated = tmp_out / rel.parent
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            os.replace(generated / f"{name}{suffix}", _HERE / f"{name}{suffix}")  # atomic: safe across processes
        for path in sorted(tmp_out.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        tmp_out.rmdir()


if any(_stale(name) for name in _PROTOS):
    _generate()

