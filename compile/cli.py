"""`neuronserve compile`, `inspect`, `keygen` and `sign`: the platform team's release-pipeline commands.

Signing (neuronserve.signing): `keygen` makes an Ed25519 key pair, `compile --signing-key` or `sign`
writes manifest.sig, `inspect --trusted-key` (like `serve --trusted-key`) refuses an artifact that is
not signed by a trusted key.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

from neuronserve.config import read_json_object
from neuronserve.errors import ConfigError


def register(subparsers) -> None:
    """The `compile`, `inspect`, `keygen` and `sign` subcommands, each with its flags and its function."""
    _add_compile(subparsers)
    _add_inspect(subparsers)
    _add_keygen(subparsers)
    _add_sign(subparsers)


def _add_compile(subparsers) -> None:
    compile_parser = subparsers.add_parser(
        "compile",
        help="trace the two-tower scorer into an artifact (cpu or neuron)",
        description="Trace the two-tower scorer's stages (user_tower, peer_tower, pair_scorer) at every batch bucket, "
        "and the whole scorer as one graph (twotower) at every pair of user and peer buckets, into a versioned "
        "artifact with manifest.json, checksums and a parity check.",
    )
    compile_parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    compile_parser.add_argument(
        "--target",
        choices=("cpu", "neuron"),
        default="cpu",
        help="cpu: torch.jit.trace; neuron: torch.neuron.trace (Inf1)",
    )
    compile_parser.add_argument(
        "--checkpoint", type=Path, help="state_dict file of a trained model (default: random weights from --seed)"
    )
    compile_parser.add_argument(
        "--model-config",
        type=Path,
        help="model config JSON (F_u, F_p, hidden, E, K, D, labels); default: the demo config",
    )
    compile_parser.add_argument(
        "--seed", type=int, default=0, help="random initialisation seed when no --checkpoint (default 0)"
    )
    compile_parser.add_argument(
        "--batch-sizes",
        default="1,8,32,128,512,1024",
        help="compiled batch buckets, comma separated (default 1,8,32,128,512,1024)",
    )
    compile_parser.add_argument(
        "--pipeline-cores", type=int, default=1, help="neuron: --neuroncore-pipeline-cores N (one graph over N cores)"
    )
    compile_parser.add_argument(
        "--fast-math", help="neuron: the compiler's --fast-math setting (default: the compiler's)"
    )
    compile_parser.add_argument("--model-name", default="twotower-demo")
    compile_parser.add_argument(
        "--model-version", help="version string (default: a content hash of config and weights)"
    )
    compile_parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    compile_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    compile_parser.add_argument(
        "--signing-key",
        type=Path,
        metavar="KEY.pem",
        help="sign the artifact (manifest.sig) with this Ed25519 PEM private key (never copied into the artifact; see keygen)",
    )
    compile_parser.set_defaults(func=_compile)


def _add_inspect(subparsers) -> None:
    inspect_parser = subparsers.add_parser(
        "inspect",
        help="verify an artifact and print its summary",
        description="Verify every file's sha256 and the schema, then print the summary; non-zero exit naming the offending file when verification fails.",
    )
    inspect_parser.add_argument("artifact", type=Path)
    inspect_parser.add_argument(
        "--trusted-key",
        type=Path,
        metavar="FILE",
        help="also require manifest.sig to be a valid signature by a key in this PEM file of Ed25519 public keys (as serve --trusted-key)",
    )
    inspect_parser.set_defaults(func=_inspect)


def _add_keygen(subparsers) -> None:
    keygen_parser = subparsers.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing artifacts",
        description="Write a new Ed25519 key pair into --out: signing-key.pem (PKCS#8 PEM private key, mode 0600: keep it in the "
        "release pipeline, never in an artifact or on a server) and signing-key.pub.pem (PEM public key: give it to serve --trusted-key).",
    )
    keygen_parser.add_argument(
        "--out", required=True, type=Path, help="directory for the key pair (made, mode 0700, if missing)"
    )
    keygen_parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen_parser.set_defaults(func=_keygen)


def _add_sign(subparsers) -> None:
    sign_parser = subparsers.add_parser(
        "sign",
        help="sign a compiled artifact (manifest.sig)",
        description="Verify an artifact's checksums, then sign its manifest.json (which lists every file's sha256) with an "
        "Ed25519 private key into manifest.sig, replacing any earlier signature. The same as compile --signing-key, for "
        "pipelines that compile and sign on different hosts.",
    )
    sign_parser.add_argument("artifact", type=Path)
    sign_parser.add_argument(
        "--signing-key", required=True, type=Path, metavar="KEY.pem", help="Ed25519 PEM private key (see keygen)"
    )
    sign_parser.set_defaults(func=_sign)


def _batch_sizes(text: str):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--batch-sizes must be comma-separated positive integers, e.g. 1,8,32; got {text!r}"
        ) from None


def _model_config(path):
    from neuronserve.artifact import ModelConfig

    if path is None:
        return ModelConfig()
    return ModelConfig.from_dict(read_json_object(path, f"--model-config {path}"), source=f"--model-config {path}")


def _compile(args: argparse.Namespace) -> int:
    from neuronserve.artifact_summary import summary_lines
    from neuronserve.compile.build import compile_artifact

    with _terminations_interrupt():
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
            signing_key=args.signing_key,
        )
    print("\n".join(summary_lines(manifest)))
    return 0


@contextlib.contextmanager
def _terminations_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a cancelled CI job, `timeout`, a closed terminal) interrupt as Ctrl-C does, so
    the compile's temporary directory is removed (their default action ends the process without cleanup)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _inspect(args: argparse.Namespace) -> int:
    from neuronserve.artifact import load_manifest
    from neuronserve.artifact_summary import summary_lines

    print("\n".join(summary_lines(load_manifest(args.artifact, verify=True, trusted_key=args.trusted_key))))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from neuronserve.signing import generate_key_pair

    private, public, fingerprint = generate_key_pair(args.out, force=args.force)
    print(f"private key  {private} (mode 0600; keep it secret, never in an artifact)")
    print(f"public key   {public} (for serve/inspect --trusted-key)")
    print(f"fingerprint  {fingerprint}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from neuronserve.artifact import MANIFEST_NAME, load_manifest, read_artifact_file
    from neuronserve.errors import ArtifactError
    from neuronserve.signing import SIGNATURE_NAME, load_signing_key, write_signature

    key = load_signing_key(args.signing_key, args.artifact)
    before = read_artifact_file(args.artifact, MANIFEST_NAME)
    load_manifest(args.artifact, verify=True)  # sign only an intact artifact
    if read_artifact_file(args.artifact, MANIFEST_NAME) != before:
        raise ArtifactError(f"{args.artifact / MANIFEST_NAME} changed while it was being verified; sign again")
    fingerprint = write_signature(args.artifact, before, key)
    print(f"signed {args.artifact / SIGNATURE_NAME} with key {fingerprint}")
    return 0
