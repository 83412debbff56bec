"""The manifest's consistency rules, checked on every load: plain file names, a known target, one bias
per label, every stage present with buckets whose files are hashed, the fused stage's (B, U) pairs,
hashed tick graphs at a (rows, columns) block."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from neuronserve.artifact_files import plain_file_name
from neuronserve.contract import FUSED_STAGE, STAGES
from neuronserve.errors import ArtifactError

if TYPE_CHECKING:
    from neuronserve.artifact import Manifest, StageSpec

TARGETS: tuple[str, ...] = ("cpu", "neuron")


def check_manifest(manifest: Manifest, where: Path) -> None:
    """An ArtifactError naming `where` (the manifest's path) for the first rule the manifest breaks."""
    for name in manifest.files:
        if not plain_file_name(name):
            raise ArtifactError(
                f"{where}: file name {name!r} is not a plain file name in the artifact directory (no '/', '..' or absolute paths); recompile the artifact"
            )
    if manifest.target not in TARGETS:
        raise ArtifactError(f"{where}: unknown target {manifest.target!r}; expected one of {', '.join(TARGETS)}")
    if len(manifest.label_bias) != manifest.model_config.num_labels:
        raise ArtifactError(
            f"{where}: label_bias has {len(manifest.label_bias)} values for {manifest.model_config.num_labels} labels"
        )
    if manifest.reference_file not in manifest.files:
        raise ArtifactError(f"{where}: reference file {manifest.reference_file} has no sha256 entry")
    unhashed = [f for f in manifest.tick_graphs.values() if f not in manifest.files]
    if unhashed:
        raise ArtifactError(f"{where}: tick graph file {unhashed[0]} has no sha256 entry")
    if manifest.tick_graphs and (len(manifest.tick_block) != 2 or min(manifest.tick_block) < 1):
        raise ArtifactError(f"{where}: tick_block {list(manifest.tick_block)} is not (rows, columns) >= 1")
    _check_stages(manifest, where)


def _check_stages(manifest: Manifest, where: Path) -> None:
    missing = [s for s in STAGES if s not in manifest.stages]
    if missing:
        raise ArtifactError(f"{where}: missing stages {missing}; recompile the artifact")
    for spec in manifest.stages.values():
        if not spec.buckets:
            raise ArtifactError(f"{where}: stage {spec.name} has no buckets")
        unhashed = [b.file for b in spec.buckets if b.file not in manifest.files]
        if unhashed:
            raise ArtifactError(f"{where}: stage file {unhashed[0]} has no sha256 entry")
        _check_user_batches(spec, where)
    if manifest.target == "neuron" and manifest.has_fused_stage:
        files = [b.file for b in manifest.stages[FUSED_STAGE].buckets]
        if len(set(files)) != len(files):
            raise ArtifactError(
                f"{where}: a neuron graph has fixed shapes, so every {FUSED_STAGE} pair needs its own file"
            )


def _check_user_batches(spec: StageSpec, where: Path) -> None:
    """FUSED_STAGE buckets are distinct (B, U) pairs with 1 <= U <= B; no other stage has a user batch."""
    fused = spec.name == FUSED_STAGE
    for bucket in spec.buckets:
        user = bucket.user_batch_size
        if fused and (user is None or not 1 <= user <= bucket.batch_size):
            raise ArtifactError(
                f"{where}: {spec.name} bucket {bucket.file} needs a user_batch_size from 1 to its batch size {bucket.batch_size}, got {user!r}"
            )
        if not fused and user is not None:
            raise ArtifactError(
                f"{where}: stage {spec.name} bucket {bucket.file} has a user_batch_size; only {FUSED_STAGE} takes one"
            )
    keys = [b.key for b in spec.buckets]
    if len(set(keys)) != len(keys):
        raise ArtifactError(f"{where}: stage {spec.name} lists a bucket twice")
