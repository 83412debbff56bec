"""`neuronserve serve` started as a subprocess by the benchmarks that need their own server (tick,
switches): the process and its gRPC address, read from its ready line."""

from __future__ import annotations

import subprocess
import sys


def start_serve(flags: list[str]) -> tuple[subprocess.Popen, str]:
    """`python -m neuronserve serve FLAGS` (which should include --port 0); returns once it printed its
    ready line ("neuronserve ready: grpc=HOST:PORT ..."), or exits saying the server did not start."""
    proc = subprocess.Popen([sys.executable, "-m", "neuronserve", "serve", *flags], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        if line.startswith("neuronserve ready:"):
            return proc, line.split("grpc=", 1)[1].split()[0]
    raise SystemExit(f"neuronserve serve exited ({proc.wait()}) before it was ready")
