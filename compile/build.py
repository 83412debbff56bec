"""Compile the two-tower scorer into a verified, versioned artifact.

compile_artifact: model (checkpoint or seeded random) -> the stages' graphs, traced and checked against
the eager model at every bucket (graphs.py; the fused stage, FUSED_STAGE, at every (B, U) pair of
buckets with U <= B) -> reference outputs -> manifest.json with sha256 of every file. The artifact is
written into a temporary directory beside `out_dir` and moved into place only when complete, so a
failed compile never leaves a half artifact behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from neuronserve.artifact import (
    MANIFEST_NAME,
    REFERENCE_NAME,
    Manifest,
    ModelConfig,
    StageSpec,
    TensorSpec,
    sha256_file,
    write_manifest,
)
from neuronserve.compile.graphs import PARITY_TOLERANCE, compile_fused, compile_stage
from neuronserve.compile.model import TwoTowerScorer, random_model
from neuronserve.compile.tick_graph import compile_tick
from neuronserve.errors import ConfigError
from neuronserve.shared_table import MAX_VERSION_BYTES
from neuronserve.signing import load_signing_key, write_signature
from neuronserve.contract import FUSED_STAGE, PAIR_SCORER, PEER_TOWER, STAGES, TICK_BLOCK, TICK_GRAPH_FILES, USER_TOWER

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32, 128, 512, 1024)
REFERENCE_ROWS = 5
REFERENCE_USERS = 2  # reference.npz's fused case: REFERENCE_ROWS peers against the first 2 users


def stage_specs(config: ModelConfig) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """Inputs and outputs of each stage; -1 is the batch dimension."""
    k, d = config.num_labels, config.label_dim
    return {
        USER_TOWER: (
            (TensorSpec("user_features", "float32", (-1, config.user_features)),),
            (TensorSpec("user_embeddings", "float32", (-1, k, d)),),
        ),
        PEER_TOWER: (
            (TensorSpec("peer_features", "float32", (-1, config.peer_features)),),
            (TensorSpec("peer_embeddings", "float32", (-1, k, d)),),
        ),
        PAIR_SCORER: (
            (
                TensorSpec("user_embeddings", "float32", (-1, k, d)),
                TensorSpec("peer_embeddings", "float32", (-1, k, d)),
            ),
            (TensorSpec("scores", "float32", (-1, k)),),
        ),
        # user_features' -1 is the user batch U; the others' the peer batch B.
        FUSED_STAGE: (
            (
                TensorSpec("user_features", "float32", (-1, config.user_features)),
                TensorSpec("peer_features", "float32", (-1, config.peer_features)),
                TensorSpec("user_index", "int64", (-1,)),
            ),
            (TensorSpec("scores", "float32", (-1, k)),),
        ),
    }


def fused_pairs(sizes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The (B, U) pairs the fused stage is compiled at: every bucket B with every bucket U <= B."""
    return tuple((b, u) for b in sizes for u in sizes if u <= b)


MAX_BATCH_SIZE = 1 << 20  # a bucket's rows, at most: tracing one holds rows x features floats several times


def check_batch_sizes(batch_sizes: Iterable[int]) -> tuple[int, ...]:
    sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
    if not sizes or sizes[0] < 1:
        raise ConfigError(
            f"batch sizes must be a non-empty list of positive integers, e.g. 1,8,32,128; got {list(batch_sizes)}"
        )
    if sizes[-1] > MAX_BATCH_SIZE:
        raise ConfigError(f"batch sizes must be at most {MAX_BATCH_SIZE} rows, got {sizes[-1]}")
    return sizes


def load_checkpoint(path, config: ModelConfig) -> TwoTowerScorer:
    """A state_dict file (torch.save(model.state_dict())) for a model of `config`; mismatches are one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"checkpoint {path} does not exist; pass the state_dict file saved from the trained two-tower model"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or non-torch file
        raise ConfigError(
            f"checkpoint {path} is not a readable torch state_dict file ({type(exc).__name__}); pass the file saved with torch.save(model.state_dict())"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; save model.state_dict()"
        )
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConfigError(
            f"checkpoint {path}: {', '.join(map(str, not_tensors[:3]))} is not a tensor; save model.state_dict() only"
        )
    not_finite = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if not_finite:
        raise ConfigError(
            f"checkpoint {path}: {', '.join(not_finite[:3])} holds NaN or Inf; the trained weights are broken"
        )
    model = TwoTowerScorer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        problems = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}" if missing else "",
                f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                f"shape {', '.join(wrong[:3])}" if wrong else "",
            )
            if part
        )
        raise ConfigError(
            f"checkpoint {path} does not match the model config ({problems}); pass the --model-config it was trained with"
        )
    model.load_state_dict(state)
    return model.eval()


def content_version(model: TwoTowerScorer) -> str:
    """Content version: the first 12 hex digits of sha256(config + weights), so equal weights give equal versions."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_artifact(directory: Path) -> bool:
    """Whether `directory` holds a neuronserve artifact's manifest, of any schema version (browser extensions
    and other bundles have a manifest.json too; --force must never delete those)."""
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"schema_version", "stages", "files", "manifest_sha256"} <= data.keys()


def _check_label(flag: str, value: str) -> None:
    """A model name or version the runtime takes: printable (one ready line), 1 to MAX_VERSION_BYTES UTF-8 bytes."""
    size = len(value.encode())
    if not 0 < size <= MAX_VERSION_BYTES or not value.isprintable():
        raise ConfigError(
            f"{flag} {value[:40]!r}: must be 1 to {MAX_VERSION_BYTES} bytes of printable characters, got {size} bytes"
        )


def _prepare_out_dir(out_dir: Path, force: bool) -> Path:
    """A fresh temporary directory beside out_dir. An existing non-empty out_dir is replaced only with
    force and only if it is an artifact (holds manifest.json): --force never deletes anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory; choose another --out")
    if out_dir == Path(out_dir.anchor) or out_dir in (Path.cwd(), *Path.cwd().parents):
        raise ConfigError(
            f"--out {out_dir} is the current directory or one of its parents; choose a new directory for the artifact"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise ConfigError(
                f"--out {out_dir} exists and is not empty; pass --force to replace it or choose another --out"
            )
        if not _is_artifact(out_dir):
            raise ConfigError(
                f"--out {out_dir} is not empty and holds no neuronserve {MANIFEST_NAME}; --force replaces only an "
                "artifact, so choose another --out"
            )
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        work.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the artifact from a non-root serving user
        return work
    except OSError as exc:
        raise ConfigError(f"cannot write the artifact to {out_dir} ({exc.strerror}); choose a writable --out") from None


def compile_artifact(
    out_dir,
    *,
    config: ModelConfig = ModelConfig(),
    batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
    seed: int = 0,
    checkpoint=None,
    target: str = "cpu",
    pipeline_cores: int = 1,
    fast_math: str | None = None,
    model_name: str = "twotower-demo",
    model_version: str | None = None,
    force: bool = False,
    progress: bool = False,
    signing_key=None,
) -> Manifest:
    """Compile the two-tower scorer into `out_dir`; returns the (written, verified) manifest. With
    `signing_key` (an Ed25519 PEM private key file, read before any work and never copied into the
    artifact), manifest.json is signed into manifest.sig (neuronserve.signing)."""
    if target not in PARITY_TOLERANCE:
        raise ConfigError(f"target must be cpu or neuron, got {target!r}")
    if pipeline_cores < 1:
        raise ConfigError(f"pipeline cores must be >= 1, got {pipeline_cores}")
    if target == "cpu" and (pipeline_cores > 1 or fast_math):
        raise ConfigError("--pipeline-cores and --fast-math apply to --target neuron only")
    sizes = check_batch_sizes(batch_sizes)
    _check_label("--model-name", model_name)
    if model_version is not None:
        _check_label("--model-version", model_version)
    private_key = load_signing_key(signing_key, out_dir) if signing_key is not None else None
    model = load_checkpoint(checkpoint, config) if checkpoint is not None else random_model(config, seed)
    version = model_version or content_version(model)
    out_dir = Path(out_dir).resolve()
    work = _prepare_out_dir(out_dir, force)
    old = work.with_name(work.name + "-old")
    try:
        _compile_into(work, model, sizes, target, pipeline_cores, fast_math, model_name, version, progress)
        if private_key is not None:
            write_signature(work, (work / MANIFEST_NAME).read_bytes(), private_key)
        if out_dir.exists():
            os.replace(out_dir, old)  # aside, not deleted, until the new artifact is in place
        os.replace(work, out_dir)
    finally:
        if old.exists() and not out_dir.exists():  # stopped between the two renames: the old one back
            os.replace(old, out_dir)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    from neuronserve.artifact import load_manifest

    return load_manifest(out_dir, verify=True)


def _compile_into(
    work: Path, model: TwoTowerScorer, sizes, target, pipeline_cores, fast_math, name, version, progress
) -> None:
    from tqdm import tqdm

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    specs = stage_specs(model.config)
    modules = model.stages()
    generator = torch.Generator().manual_seed(1234)
    stages: dict[str, StageSpec] = {}
    files: dict[str, str] = {}
    compiler_args: tuple[str, ...] = ()
    pairs = fused_pairs(sizes)
    per_bucket = target == "neuron"  # fixed shapes; cpu: one shape-generic graph per stage
    fused_graphs = len(pairs) if per_bucket else 1
    bar = tqdm(
        total=len(STAGES) * (len(sizes) if per_bucket else 1)
        + fused_graphs
        + (len(TICK_GRAPH_FILES) if per_bucket else 0),
        desc=f"compile {target}",
        unit="graph",
        disable=not progress,
        file=sys.stderr,
    )
    with bar:
        for stage in STAGES:
            inputs_spec, outputs_spec = specs[stage]
            entries, args = compile_stage(
                work,
                stage,
                modules[stage],
                inputs_spec,
                sizes,
                target,
                pipeline_cores,
                fast_math,
                files,
                bar,
                generator,
            )
            compiler_args = args or compiler_args
            stages[stage] = StageSpec(stage, inputs_spec, outputs_spec, tuple(entries))
        inputs_spec, outputs_spec = specs[FUSED_STAGE]
        entries = compile_fused(work, model, pairs, target, pipeline_cores, fast_math, files, bar)
        stages[FUSED_STAGE] = StageSpec(FUSED_STAGE, inputs_spec, outputs_spec, tuple(entries))
        # neuron only: on the cpu backend the tick runs on the host (docs/tick.md)
        tick_graphs = compile_tick(work, model.config, target, fast_math, files, bar) if per_bucket else {}
    if target == "neuron":
        from neuronserve.compile.neuron import torch_neuron_version

        neuron_version = torch_neuron_version()
    else:
        neuron_version = None
    files[REFERENCE_NAME] = _write_reference(work / REFERENCE_NAME, model, generator)
    for stage, spec in stages.items():
        worst = max(b.parity_max_abs_err for b in spec.buckets)
        if progress:
            print(
                f"parity {stage:<12} max |traced - eager| = {worst:.2e} over {len(spec.buckets)} buckets",
                file=sys.stderr,
            )
    manifest = Manifest(
        model_name=name,
        model_version=version,
        target=target,
        model_config=model.config,
        stages=stages,
        files=files,
        label_bias=tuple(float(b) for b in model.label_bias.detach()),
        compiler_args=tuple(compiler_args),
        pipeline_cores=pipeline_cores,
        torch_version=torch.__version__,
        torch_neuron_version=neuron_version,
        parity_tolerance=PARITY_TOLERANCE[target],
        tick_graphs=tick_graphs,
        tick_block=TICK_BLOCK if tick_graphs else (),
        directory=work,
    )
    write_manifest(manifest)


def _write_reference(path: Path, model: TwoTowerScorer, generator: torch.Generator) -> str:
    """Fixed inputs and the eager model's outputs: the runtime's and a user's check that an artifact scores right."""
    cfg = model.config
    user = torch.randn(REFERENCE_ROWS, cfg.user_features, generator=generator)
    peer = torch.randn(REFERENCE_ROWS, cfg.peer_features, generator=generator)
    # The fused stage's case: every peer scored against user user_index[i] of the first REFERENCE_USERS users.
    user_index = torch.arange(REFERENCE_ROWS, dtype=torch.int64) % REFERENCE_USERS
    with torch.no_grad():
        stages = model.stages()
        user_emb = stages[USER_TOWER](user)
        peer_emb = stages[PEER_TOWER](peer)
        scores = model(user, peer)
        indexed_scores = model(user[:REFERENCE_USERS].index_select(0, user_index), peer)
    np.savez(
        path,
        user_features=user.numpy(),
        peer_features=peer.numpy(),
        user_embeddings=user_emb.numpy(),
        peer_embeddings=peer_emb.numpy(),
        scores=scores.numpy(),
        user_index=user_index.numpy(),  # into user_features[:REFERENCE_USERS]
        indexed_scores=indexed_scores.numpy(),
    )
    return sha256_file(path)
