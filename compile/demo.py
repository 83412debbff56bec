"""The embedded default of `neuronserve serve`: the demo model compiled for the CPU on first run, then reused.

The artifact lives in $NEURONSERVE_CACHE_DIR (default ~/.cache/neuronserve), one directory per
torch version (a traced graph is tied to the torch that traced it). An artifact that fails
verification there is recompiled, and so is one compiled before the fused stage (artifact.FUSED_STAGE)
existed: the entry is our own cache, and the fused graph is what serves a data-parallel batch in one
execution.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from neuronserve.artifact import MANIFEST_NAME, ModelConfig, load_manifest
from neuronserve.compile.build import compile_artifact
from neuronserve.errors import ArtifactError, ConfigError


def cache_root() -> Path:
    return Path(os.environ.get("NEURONSERVE_CACHE_DIR") or Path.home() / ".cache" / "neuronserve")


def ensure_demo_artifact(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The demo artifact's directory: verified if present, compiled (seed 0, default config) if not."""
    directory = Path(cache_dir or cache_root()) / f"demo-cpu-torch{torch.__version__.split('+')[0]}"
    try:
        if load_manifest(directory, verify=True).has_fused_stage:
            return directory
        reason = "it predates the fused graph"
    except ArtifactError:
        reason = ""
    if directory.is_dir() and not (directory / MANIFEST_NAME).is_file():
        shutil.rmtree(
            directory
        )  # our own cache entry, broken beyond an artifact (compile --force replaces only artifacts)
    if progress:
        why = f"recompiling: {reason}" if reason else "first run only"
        print(f"neuronserve: compiling the demo model for the CPU into {directory} ({why})", file=sys.stderr)
    try:
        compile_artifact(directory, config=ModelConfig(), seed=0, target="cpu", force=True, progress=progress)
    except ConfigError as exc:  # e.g. an unwritable cache: name the setting the user controls here
        raise ConfigError(
            f"cannot build the demo artifact in {directory} ({exc}); set NEURONSERVE_CACHE_DIR to a writable directory"
        ) from None
    return directory
