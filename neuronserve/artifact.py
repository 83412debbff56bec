"""The artifact: a directory of traced stages plus manifest.json, the contract between compile and runtime.

compile/ writes it (write_manifest); the runtime reads it (load_manifest), which verifies the schema,
the manifest's own content hash (`manifest_sha256`) and the sha256 of every file, and with a trusted key
(signing.py) an Ed25519 signature over manifest.json, refusing a tampered, truncated or incompatible
artifact with an ArtifactError naming the file. Bytes handed to a loader (Manifest.file_bytes) are the
bytes whose sha256 was checked, never a second read of the path. Nothing here imports torch. The
stages, the fused graph's (B, U) pairs and the schema's compatibility rules: docs/artifact.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neuronserve.contract import FUSED_STAGE
from neuronserve.artifact_files import (  # noqa: F401 (read_artifact_file, sha256_file: compile imports them from here)
    path_exists,
    plain_file_name,
    read_artifact_file,
    sha256_file,
)
from neuronserve.artifact_checks import check_manifest
from neuronserve.errors import ArtifactError
from neuronserve.signing import SIGNATURE_NAME, SignatureCheck, check_signature, load_trusted_keys

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: manifest_sha256
MANIFEST_HASH_KEY = "manifest_sha256"
MANIFEST_NAME = "manifest.json"
REFERENCE_NAME = "reference.npz"


MAX_DIMENSION = 1 << 20  # a model dimension above it is a typo, not a model


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_DIMENSION


@dataclass(frozen=True)
class ModelConfig:
    """The two-tower scorer's shape: features F_u/F_p -> MLP (hidden) -> E -> K projections of D."""

    user_features: int = 64
    peer_features: int = 64
    hidden_sizes: tuple[int, ...] = (256,)
    embedding_dim: int = 128
    num_labels: int = 4
    label_dim: int = 64
    label_names: tuple[str, ...] = ("like", "chat", "match", "report")

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_names", tuple(str(n) for n in self.label_names))
        for name in ("user_features", "peer_features", "embedding_dim", "num_labels", "label_dim"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ArtifactError(f"model config: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.hidden_sizes, (list, tuple)) or not all(_positive_int(h) for h in self.hidden_sizes):
            raise ArtifactError(
                f"model config: hidden_sizes must be a list of positive integers, got {self.hidden_sizes!r}"
            )
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        if len(self.label_names) != self.num_labels:
            raise ArtifactError(
                f"model config: {len(self.label_names)} label_names for num_labels={self.num_labels}; give one name per label"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["hidden_sizes"] = list(self.hidden_sizes)
        data["label_names"] = list(self.label_names)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(f"{source}: unknown keys {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a stage. Shape uses -1 for the batch dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class BucketEntry:
    """A stage traced at one batch size; for FUSED_STAGE, at one (batch_size B, user_batch_size U) pair."""

    batch_size: int
    file: str
    parity_max_abs_err: float
    user_batch_size: int | None = None  # FUSED_STAGE only: the user rows U the graph takes

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.user_batch_size is None:
            del data["user_batch_size"]  # the three stages' entries read as they always did
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BucketEntry:
        user = data.get("user_batch_size")
        return cls(
            int(data["batch_size"]),
            str(data["file"]),
            float(data["parity_max_abs_err"]),
            None if user is None else int(user),
        )

    @property
    def key(self) -> tuple[int, int]:
        return (self.batch_size, self.user_batch_size or 0)


@dataclass(frozen=True)
class StageSpec:
    """One stage: its tensors (-1: the batch dimension; for FUSED_STAGE's user_features, the user
    batch U) and its compiled buckets."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    buckets: tuple[BucketEntry, ...]  # ascending (batch size, user batch size)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The compiled batch sizes B (for FUSED_STAGE, the peer batches), ascending, each once."""
        return tuple(sorted({b.batch_size for b in self.buckets}))

    def user_batch_sizes(self, batch_size: int) -> tuple[int, ...]:
        """FUSED_STAGE: the user batches U compiled with peer batch `batch_size`, ascending (empty if none)."""
        return tuple(
            sorted(
                b.user_batch_size for b in self.buckets if b.batch_size == batch_size and b.user_batch_size is not None
            )
        )

    def bucket(self, batch_size: int, user_batch_size: int | None = None) -> BucketEntry:
        for entry in self.buckets:
            if entry.batch_size == batch_size and entry.user_batch_size == user_batch_size:
                return entry
        what = f"batch size {batch_size}" + (
            f" with user batch {user_batch_size}" if user_batch_size is not None else ""
        )
        raise ArtifactError(
            f"stage {self.name} has no bucket of {what}; compiled: {[b.key if b.user_batch_size else b.batch_size for b in self.buckets]}"
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "buckets": [b.to_dict() for b in self.buckets],
        }

    @classmethod
    def from_dict(cls, data: dict) -> StageSpec:
        buckets = tuple(sorted((BucketEntry.from_dict(b) for b in data["buckets"]), key=lambda b: b.key))
        return cls(
            name=str(data["name"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            buckets=buckets,
        )


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed. `directory` is where the artifact lives (not stored in the file)."""

    model_name: str
    model_version: str
    target: str  # cpu | neuron
    model_config: ModelConfig
    stages: dict[str, StageSpec]
    files: dict[str, str]  # file name -> sha256, every file of the artifact but the manifest
    label_bias: tuple[float, ...] = ()  # b_k, K values: what pair_scorer adds, for the cached-embedding fast path
    compiler_args: tuple[str, ...] = ()
    pipeline_cores: int = 1
    torch_version: str = ""
    torch_neuron_version: str | None = None
    reference_file: str = REFERENCE_NAME  # fixed inputs and the eager model's outputs (npz)
    parity_tolerance: float = 1e-5
    tick_graphs: dict[str, str] = field(default_factory=dict)  # label space -> tick graph file (neuron only)
    tick_block: tuple[int, ...] = ()  # (rows, columns) the tick graphs were compiled at
    schema_version: int = SCHEMA_VERSION
    directory: Path = field(default=Path("."), compare=False)
    signature: SignatureCheck | None = field(default=None, compare=False)  # what load_manifest found in manifest.sig
    _verified: _VerifiedFiles = field(default_factory=lambda: _VerifiedFiles(), init=False, compare=False, repr=False)

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.model_config.label_names

    @property
    def has_fused_stage(self) -> bool:
        """True when the artifact holds FUSED_STAGE (compiled by a neuronserve that writes it)."""
        return FUSED_STAGE in self.stages

    def stage(self, name: str) -> StageSpec:
        try:
            return self.stages[name]
        except KeyError:
            raise ArtifactError(
                f"artifact {self.directory} has no stage {name!r}; it has {sorted(self.stages)}"
            ) from None

    def path(self, file_name: str) -> Path:
        return self.directory / file_name

    def file_bytes(self, file_name: str) -> bytes:
        """The bytes of an artifact file, checked against its sha256 in this manifest: those kept when
        load_manifest(keep_files=True) verified them, else read once now (read_artifact_file) and
        checked. Loaders load from these bytes, never from the path: a file swapped on disk after
        the check changes nothing. Kept until release_files()."""
        return self._verified.get(self, file_name)

    def file_stream(self, file_name: str) -> io.BytesIO:
        """file_bytes as a file object (for torch.jit.load), `name` set to the file's path."""
        stream = io.BytesIO(self.file_bytes(file_name))
        stream.name = str(self.path(file_name))
        return stream

    def release_files(self) -> None:
        """Drop the verified bytes kept for loading (the pipeline calls it once every stage is loaded);
        a later file_bytes reads and checks the file again."""
        self._verified.clear()

    def max_parity_error(self) -> float:
        """The largest parity error over every stage and bucket; NaN if any bucket was not checked
        (a neuron graph compiled on a host without NeuronCores)."""
        return worst_error(b.parity_max_abs_err for s in self.stages.values() for b in s.buckets)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "model": {"name": self.model_name, "version": self.model_version},
            "target": self.target,
            "model_config": self.model_config.to_dict(),
            "label_names": list(self.label_names),
            "stages": {name: spec.to_dict() for name, spec in self.stages.items()},
            "files": dict(sorted(self.files.items())),
            "label_bias": list(self.label_bias),
            "compiler_args": list(self.compiler_args),
            "pipeline_cores": self.pipeline_cores,
            "torch_version": self.torch_version,
            "torch_neuron_version": self.torch_neuron_version,
            "reference_file": self.reference_file,
            "parity_tolerance": self.parity_tolerance,
            "tick_graphs": dict(sorted(self.tick_graphs.items())),
            "tick_block": list(self.tick_block),
        }

    @classmethod
    def from_dict(cls, data: dict, directory: Path) -> Manifest:
        where = directory / MANIFEST_NAME
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: schema_version {version!r} is not supported (this neuronserve reads {SCHEMA_VERSION}); recompile the artifact"
            )
        try:
            manifest = cls(
                model_name=str(data["model"]["name"]),
                model_version=str(data["model"]["version"]),
                target=str(data["target"]),
                model_config=ModelConfig.from_dict(data["model_config"], source=str(where)),
                stages={name: StageSpec.from_dict(spec) for name, spec in data["stages"].items()},
                files={str(k): str(v) for k, v in data["files"].items()},
                label_bias=tuple(float(b) for b in data["label_bias"]),
                compiler_args=tuple(str(a) for a in data.get("compiler_args", ())),
                pipeline_cores=int(data.get("pipeline_cores", 1)),
                torch_version=str(data.get("torch_version", "")),
                torch_neuron_version=data.get("torch_neuron_version"),
                reference_file=str(data.get("reference_file", REFERENCE_NAME)),
                parity_tolerance=float(data.get("parity_tolerance", 1e-5)),
                tick_graphs={str(k): str(v) for k, v in data.get("tick_graphs", {}).items()},
                tick_block=tuple(int(n) for n in data.get("tick_block", ())),
                schema_version=int(version),
                directory=directory,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{where}: malformed manifest ({type(exc).__name__}: {exc}); recompile the artifact"
            ) from None
        check_manifest(manifest, where)
        return manifest


def manifest_hash(data: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without its own hash."""
    body = {k: v for k, v in data.items() if k != MANIFEST_HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(manifest: Manifest) -> Path:
    """Write manifest.json atomically into manifest.directory (after every listed file is written)."""
    path = manifest.directory / MANIFEST_NAME
    data = json.loads(json.dumps(manifest.to_dict()))  # as it will read back (tuples become lists)
    data[MANIFEST_HASH_KEY] = manifest_hash(data)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _checked(manifest: Manifest, name: str, data: bytes) -> bytes:
    """`data` if its sha256 is the one manifest.files lists for `name`; else an ArtifactError."""
    expected = manifest.files.get(name)
    if expected is None:
        raise ArtifactError(
            f"artifact file {manifest.path(name)} is not listed in {manifest.directory / MANIFEST_NAME}"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ArtifactError(
            f"artifact file {manifest.path(name)} fails its checksum (sha256 {actual[:12]}..., manifest says {expected[:12]}...): "
            "it was changed or truncated; recompile or restore the artifact"
        )
    return data


class _VerifiedFiles:
    """A manifest's checked file bytes, kept for the loaders (Manifest.file_bytes); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, bytes] = {}

    def keep(self, name: str, data: bytes) -> None:
        with self._lock:
            self._bytes[name] = data

    def get(self, manifest: Manifest, name: str) -> bytes:
        with self._lock:
            if name not in self._bytes:
                self._bytes[name] = _checked(manifest, name, read_artifact_file(manifest.directory, name))
            return self._bytes[name]

    def clear(self) -> None:
        with self._lock:
            self._bytes.clear()


def load_manifest(directory, verify: bool = True, trusted_key=None, keep_files: bool = False) -> Manifest:
    """Read DIR/manifest.json; errors name the file.

    verify: check the manifest's own hash and every file's sha256. trusted_key: a PEM file of public
    keys (signing.load_trusted_keys); then manifest.sig must be a valid signature of manifest.json's
    bytes, as read here, by one of them (checked even without verify). keep_files (with verify): keep
    the checked bytes for the loaders (Manifest.file_bytes) until release_files(), so each file is
    read once. `signature` on the result says what manifest.sig held.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path_exists(directory, follow=True):
        raise ArtifactError(
            f"artifact directory {directory} does not exist; compile one with `neuronserve compile --out {directory}`"
        )
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory} is a file; an artifact is the directory `neuronserve compile --out DIR` wrote"
        )
    if not path_exists(path):
        raise ArtifactError(
            f"{path} is missing: {directory} is not a neuronserve artifact (compile one with `neuronserve compile`)"
        )
    sig_present = path_exists(directory / SIGNATURE_NAME)
    trusted = load_trusted_keys(trusted_key) if trusted_key is not None else None
    raw = read_artifact_file(directory, MANIFEST_NAME)
    sig_bytes = read_artifact_file(directory, SIGNATURE_NAME) if sig_present else None
    signature = check_signature(raw, sig_bytes, str(directory / SIGNATURE_NAME), trusted)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged, recompile it") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; the artifact is damaged, recompile it")
    manifest = Manifest.from_dict(data, directory)
    object.__setattr__(manifest, "signature", signature)
    if verify:
        if data.get(MANIFEST_HASH_KEY) != manifest_hash(data):
            raise ArtifactError(
                f"{path} fails its content hash ({MANIFEST_HASH_KEY}): it was edited after compilation; recompile or restore the artifact"
            )
        verify_files(manifest, keep=keep_files)
    if signature.signed and not signature.valid:
        log.warning(
            "%s: %s; loaded anyway (no trusted key configured: integrity only)",
            directory / SIGNATURE_NAME,
            signature.describe(),
        )
    return manifest


def verify_files(manifest: Manifest, keep: bool = False) -> None:
    """Read every listed file once (read_artifact_file) and check its sha256; with keep, keep the bytes
    for Manifest.file_bytes. The first failure is an ArtifactError naming the file."""
    for name in manifest.files:
        data = _checked(manifest, name, read_artifact_file(manifest.directory, name))
        if keep:
            manifest._verified.keep(name, data)


def worst_error(errors) -> float:
    """The largest parity error; NaN if any is NaN (not checked)."""
    errors = list(errors)
    return float("nan") if any(math.isnan(e) for e in errors) else max(errors)
