"""`python -m neuronserve.bench ...`: the bench subcommand on its own (same flags as `neuronserve bench`)."""

from __future__ import annotations

import argparse
import sys

from neuronserve.bench import cli
from neuronserve.errors import NeuronServeError


def main() -> int:
    parser = argparse.ArgumentParser(prog="neuronserve")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    args = parser.parse_args(["bench"] + sys.argv[1:])
    try:
        return args.func(args)
    except NeuronServeError as exc:
        print(f"neuronserve bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
