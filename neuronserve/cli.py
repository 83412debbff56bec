"""The `neuronserve` console command: compile | inspect | serve | bench.

Each subcommand lives with its code (compile/, server.py, bench/) and registers itself here through
`register(subparsers)`, which sets `func(args) -> int`. Heavy imports (torch, grpc) happen inside
`func`, so `neuronserve --help` is fast. Every NeuronServeError becomes one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from neuronserve.errors import NeuronServeError


def build_parser() -> argparse.ArgumentParser:
    from neuronserve.bench import cli as bench_cli
    from neuronserve.compile import cli as compile_cli
    from neuronserve import __version__, server

    parser = argparse.ArgumentParser(
        prog="neuronserve",
        description="Serve a two-tower match scorer on AWS Inferentia NeuronCores (or the CPU / simulated cores).",
    )
    parser.add_argument("--version", action="version", version=f"neuronserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    compile_cli.register(sub)  # compile, inspect
    server.register(sub)  # serve
    sub.choices["serve"].set_defaults(func=_serve)
    bench_cli.register(sub)  # bench
    return parser


def _serve(args: argparse.Namespace) -> int:
    """`serve`, plus the embedded default: with no artifact configured, compile the demo model for
    the CPU into the cache directory on first run (reused afterwards) and serve that."""
    import dataclasses

    from neuronserve import server

    config = server.resolve_config(args)
    if config.artifact is None:
        from neuronserve.compile.demo import ensure_demo_artifact

        config = dataclasses.replace(config, artifact=str(ensure_demo_artifact(progress=True)))
    return server.run(config)


def main(argv: Optional[List[str]] = None) -> int:
    command = "neuronserve"
    try:
        args = build_parser().parse_args(argv)
        command = f"neuronserve {args.command}"
        return int(args.func(args) or 0)
    except NeuronServeError as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
