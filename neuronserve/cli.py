"""The `neuronserve` console command: compile | inspect | keygen | sign | serve | bench | health.

Each subcommand lives with its code (compile/, serve.py, bench/) and registers itself here through
`register(subparsers)`, which sets `func(args) -> int`. Heavy imports (torch, grpc) happen inside
`func`, so `neuronserve --help` is fast. Every NeuronServeError becomes one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from neuronserve.errors import NeuronServeError


def build_parser() -> argparse.ArgumentParser:
    from neuronserve.bench import cli as bench_cli
    from neuronserve.compile import cli as compile_cli
    from neuronserve import __version__, probe, serve

    parser = argparse.ArgumentParser(
        prog="neuronserve",
        description="Serve a two-tower match scorer on AWS Inferentia NeuronCores (or the CPU / simulated cores).",
    )
    parser.add_argument("--version", action="version", version=f"neuronserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    compile_cli.register(sub)  # compile, inspect, keygen, sign
    serve.register(sub)  # serve
    bench_cli.register(sub)  # bench
    probe.register(sub)  # health
    from neuronserve import experiments

    experiments.register(sub)  # experiment assign | schedule
    return parser


def main(argv: list[str] | None = None) -> int:
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
