"""`neuronserve compile` and `neuronserve inspect`: the platform team's release-pipeline commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuronserve.config import read_json_object
from neuronserve.errors import ConfigError


def register(subparsers) -> None:
    compile_parser = subparsers.add_parser(
        "compile",
        help="trace the two-tower scorer into an artifact (cpu or neuron)",
        description="Trace the two-tower scorer's stages (user_tower, peer_tower, pair_scorer) at every batch bucket, "
        "and the whole scorer as one graph (twotower) at every pair of user and peer buckets, into a versioned "
        "artifact with manifest.json, checksums and a parity check.",
    )
    compile_parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    compile_parser.add_argument("--target", choices=("cpu", "neuron"), default="cpu", help="cpu: torch.jit.trace; neuron: torch.neuron.trace (Inf1)")
    compile_parser.add_argument("--checkpoint", type=Path, help="state_dict file of a trained model (default: random weights from --seed)")
    compile_parser.add_argument("--model-config", type=Path, help="model config JSON (F_u, F_p, hidden, E, K, D, labels); default: the demo config")
    compile_parser.add_argument("--seed", type=int, default=0, help="random initialisation seed when no --checkpoint (default 0)")
    compile_parser.add_argument("--batch-sizes", default="1,8,32,128,512,1024", help="compiled batch buckets, comma separated (default 1,8,32,128,512,1024)")
    compile_parser.add_argument("--pipeline-cores", type=int, default=1, help="neuron: --neuroncore-pipeline-cores N (one graph over N cores)")
    compile_parser.add_argument("--fast-math", help="neuron: the compiler's --fast-math setting (default: the compiler's)")
    compile_parser.add_argument("--model-name", default="twotower-demo")
    compile_parser.add_argument("--model-version", help="version string (default: a content hash of config and weights)")
    compile_parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    compile_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    compile_parser.set_defaults(func=_compile)

    inspect_parser = subparsers.add_parser(
        "inspect", help="verify an artifact and print its summary", description="Verify every file's sha256 and the schema, then print the summary; non-zero exit naming the offending file when verification fails."
    )
    inspect_parser.add_argument("artifact", type=Path)
    inspect_parser.set_defaults(func=_inspect)


def _batch_sizes(text: str):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated positive integers, e.g. 1,8,32; got {text!r}") from None


def _model_config(path):
    from neuronserve.artifact import ModelConfig

    if path is None:
        return ModelConfig()
    return ModelConfig.from_dict(read_json_object(path, f"--model-config {path}"), source=f"--model-config {path}")


def _compile(args: argparse.Namespace) -> int:
    from neuronserve.artifact import summary_lines
    from neuronserve.compile.build import compile_artifact

    manifest = compile_artifact(
        args.out,
        config=_model_config(args.model_config),
        batch_sizes=_batch_sizes(args.batch_sizes),
        seed=args.seed,
        checkpoint=args.checkpoint,
        target=args.target,
        pipeline_cores=args.pipeline_cores,
        fast_math=args.fast_math,
        model_name=args.model_name,
        model_version=args.model_version,
        force=args.force,
        progress=not args.quiet,
    )
    print("\n".join(summary_lines(manifest)))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from neuronserve.artifact import load_manifest, summary_lines

    print("\n".join(summary_lines(load_manifest(args.artifact, verify=True))))
    return 0
