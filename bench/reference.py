"""bench's reference servers (`--reference NAME`): each is started in a subprocess on --artifact and
measured by the same generator as the target, so the target's result reads as a ratio of it.

- `plain` (plain.py): the obvious grpc.aio server, the model once per request on the event loop.
- `probe` (probe.py): issue 9's probe, a work-conserving batcher on one worker thread, no admission.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from neuronserve.errors import Unavailable


@dataclass(frozen=True)
class ReferenceKind:
    """One reference server: its module (run with -m), what it is, and the bench workloads it answers."""

    module: str
    how: str
    workloads: tuple[str, ...]


KINDS = {
    "plain": ReferenceKind(
        "neuronserve.bench.plain",
        "grpc.aio + uvloop, the artifact's CPU TorchScript graph(s) once per request on the event loop, 1 torch thread, no batching",
        ("score", "oip"),
    ),
    "probe": ReferenceKind(
        "neuronserve.bench.probe",
        "issue 9's probe: grpc.aio + uvloop, one future per request, a worker thread that takes everything pending "
        "and runs the artifact's fused graph once per batch, 1 torch thread, no admission or deadlines",
        ("oip",),
    ),
}


class ReferenceServer:
    """bench's handle on a reference server subprocess: `with ReferenceServer("plain", artifact) as ref:
    ref.target, ref.pid`; `extra` is appended to its command line (plain: --three-stages)."""

    def __init__(self, name: str, artifact: str, model_name: str = "twotower", extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.argv = [
            sys.executable,
            "-m",
            KINDS[name].module,
            "--artifact",
            artifact,
            "--port",
            "0",
            "--model",
            model_name,
        ]
        self.argv += extra
        self.target = ""
        self.pid = 0

    def __enter__(self) -> ReferenceServer:
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None  # stdout=PIPE
        line = self._proc.stdout.readline()  # "" at once if it exits; its stderr is bench's
        if "port=" not in line:
            self.__exit__()
            raise Unavailable(
                f"reference: the {self.name} server did not start (said {line.strip()!r}, exit {self._proc.poll()})"
            )
        self.target, self.pid = f"127.0.0.1:{int(line.split('port=')[1].split()[0])}", self._proc.pid
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
