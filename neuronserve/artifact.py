"""The artifact: a directory of traced stages plus manifest.json, the contract between compile and runtime.

compile/ writes it (write_manifest); the runtime reads it (load_manifest), which verifies the schema,
the manifest's own content hash (`manifest_sha256`: label bias, names and config are served from it)
and the sha256 of every file, and refuses a tampered, truncated or incompatible artifact with an
ArtifactError naming the file. Nothing here imports torch.

That is integrity, not authenticity: whoever can write the artifact can also recompute the hashes.
With a trusted key (signing.py), load_manifest also requires manifest.sig, an Ed25519 signature over
manifest.json's bytes, by that key. Every file is read through one descriptor, inside the artifact
directory and a regular file only (read_artifact_file); bytes handed to a loader (Manifest.file_bytes)
are the bytes whose sha256 was checked, never a second read of the path.

Stages: STAGES, the three graphs model pipelining places on core groups (user_tower, peer_tower,
pair_scorer), plus FUSED_STAGE ("twotower"), the whole scorer as one graph for data parallelism:
user_features [U, F_u] f32, peer_features [B, F_p] f32, user_index [B] int64 (values in [0, U)) ->
scores [B, K] f32, exactly user_tower -> take(user_index) -> pair_scorer, the gather done on the device
(index_select). In its StageSpec each BucketEntry is one compiled (B, U) pair (`user_batch_size` = U;
U and B from the compiled bucket list, U <= B). Files: neuron, one fixed-shape graph per (U, B) pair;
cpu, one graph shared by every pair (a CPU-traced graph is shape-generic, so more files would be
copies of it and of the weights; compile checks its parity at each pair), and the runtime still runs
only the listed pairs, as the device does. The fused
stage is optional on load: artifacts compiled before it lack it and the runtime falls back to the
three stages; compile always writes it. Adding it kept the schema at 2: readers that predate it
ignore the stage and the bucket field, so old artifacts load here and new ones load there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import stat
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neuronserve.contract import FUSED_STAGE, STAGES
from neuronserve.errors import ArtifactError
from neuronserve.signing import SIGNATURE_NAME, SignatureCheck, check_signature, load_trusted_keys

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: manifest_sha256
MANIFEST_HASH_KEY = "manifest_sha256"
MANIFEST_NAME = "manifest.json"
REFERENCE_NAME = "reference.npz"
TARGETS: tuple[str, ...] = ("cpu", "neuron")


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
        return _worst(b.parity_max_abs_err for s in self.stages.values() for b in s.buckets)

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
                schema_version=int(version),
                directory=directory,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{where}: malformed manifest ({type(exc).__name__}: {exc}); recompile the artifact"
            ) from None
        for name in manifest.files:
            if not _plain_file_name(name):
                raise ArtifactError(
                    f"{where}: file name {name!r} is not a plain file name in the artifact directory (no '/', '..' or absolute paths); recompile the artifact"
                )
        if manifest.target not in TARGETS:
            raise ArtifactError(f"{where}: unknown target {manifest.target!r}; expected one of {', '.join(TARGETS)}")
        if len(manifest.label_bias) != manifest.model_config.num_labels:
            raise ArtifactError(
                f"{where}: label_bias has {len(manifest.label_bias)} values for {manifest.model_config.num_labels} labels"
            )
        missing = [s for s in STAGES if s not in manifest.stages]
        if missing:
            raise ArtifactError(f"{where}: missing stages {missing}; recompile the artifact")
        for spec in manifest.stages.values():
            if not spec.buckets:
                raise ArtifactError(f"{where}: stage {spec.name} has no buckets")
            for bucket in spec.buckets:
                if bucket.file not in manifest.files:
                    raise ArtifactError(f"{where}: stage file {bucket.file} has no sha256 entry")
            _check_user_batches(spec, where)
        if manifest.target == "neuron" and manifest.has_fused_stage:
            files = [b.file for b in manifest.stages[FUSED_STAGE].buckets]
            if len(set(files)) != len(files):
                raise ArtifactError(
                    f"{where}: a neuron graph has fixed shapes, so every {FUSED_STAGE} pair needs its own file"
                )
        if manifest.reference_file not in manifest.files:
            raise ArtifactError(f"{where}: reference file {manifest.reference_file} has no sha256 entry")
        return manifest


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _plain_file_name(name: str) -> bool:
    """True for a name that stays in the artifact directory: one path component, not '.' or '..'."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def read_artifact_file(directory, name: str) -> bytes:
    """The whole content of DIR/`name`, read through one file descriptor. Refused with an ArtifactError
    naming the path when it leads outside the artifact directory (`..`, a symlink out: a symlink to
    another file inside is followed), is missing, is not a regular file (a directory, a device such as
    /dev/zero, a FIFO: opened non-blocking, so a FIFO never hangs the read) or cannot be read
    (permissions: one line, never a traceback)."""
    directory = Path(directory)
    path = directory / name
    if not _plain_file_name(name):
        raise ArtifactError(
            f"artifact file {path} leads outside the artifact directory {directory}; recompile the artifact"
        )
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ArtifactError(
            f"artifact file {path} is a symlink to {real}, outside the artifact directory: every file must be inside it; "
            "copy the artifact whole (no symlinks out) or recompile it"
        )
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ArtifactError(f"artifact file {path} is missing; recompile or restore the artifact") from None
    except OSError as exc:
        raise ArtifactError(
            f"artifact file {path} cannot be read ({exc.strerror}); give the serving user read access to the artifact"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((text for test, text in _FILE_KINDS if test(mode)), "not a regular file")
            raise ArtifactError(
                f"artifact file {path} is {kind}, not a regular file; recompile or restore the artifact"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise ArtifactError(
            f"artifact file {path} cannot be read ({exc.strerror}); give the serving user read access to the artifact"
        ) from None
    finally:
        os.close(fd)


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


def _exists(path: Path, follow: bool = False) -> bool:
    """Whether `path` exists (unless `follow`, a dangling symlink does: reading it says why it fails);
    an ArtifactError when that cannot be known (a directory on the way the serving user may not search)."""
    try:
        os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise ArtifactError(
            f"{path} cannot be read ({exc.strerror}); give the serving user access to the artifact"
        ) from None
    return True


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
    if not _exists(directory, follow=True):
        raise ArtifactError(
            f"artifact directory {directory} does not exist; compile one with `neuronserve compile --out {directory}`"
        )
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory} is a file; an artifact is the directory `neuronserve compile --out DIR` wrote"
        )
    if not _exists(path):
        raise ArtifactError(
            f"{path} is missing: {directory} is not a neuronserve artifact (compile one with `neuronserve compile`)"
        )
    sig_present = _exists(directory / SIGNATURE_NAME)
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


def summary_lines(manifest: Manifest) -> list[str]:
    """Human-readable summary, for `neuronserve inspect` and the compile report."""
    cfg = manifest.model_config
    lines = [
        f"artifact   {manifest.directory}",
        f"model      {manifest.model_name} version {manifest.model_version} (schema {manifest.schema_version})",
        f"target     {manifest.target}  pipeline_cores={manifest.pipeline_cores}  compiler_args={' '.join(manifest.compiler_args) or '-'}",
        f"torch      {manifest.torch_version}"
        + (f"  torch-neuron {manifest.torch_neuron_version}" if manifest.torch_neuron_version else ""),
        f"config     F_u={cfg.user_features} F_p={cfg.peer_features} hidden={list(cfg.hidden_sizes)} E={cfg.embedding_dim} K={cfg.num_labels} D={cfg.label_dim}",
        f"labels     {', '.join(manifest.label_names)}",
    ]
    for name in STAGES:
        spec = manifest.stages[name]
        lines.append(f"stage      {name}: {_signature(spec)}")
        for b in spec.buckets:
            lines.append(f"             batch {b.batch_size:>5}  {b.file}  parity max|err|={b.parity_max_abs_err:.2e}")
    if manifest.has_fused_stage:
        spec = manifest.stages[FUSED_STAGE]
        lines.append(f"stage      {FUSED_STAGE} (fused, U user rows): {_signature(spec)}")
        files: dict[tuple[int, str], list[BucketEntry]] = {}
        for b in spec.buckets:  # one line per B and file: its user batches (a cpu file serves them all)
            files.setdefault((b.batch_size, b.file), []).append(b)
        for (batch, file), entries in files.items():
            users = ",".join(str(b.user_batch_size) for b in entries)
            worst = _worst(b.parity_max_abs_err for b in entries)
            lines.append(
                f"             batch {batch:>5}  users {users:<{_users_width(spec)}}  {file}  parity max|err|={worst:.2e}"
            )
    else:
        lines.append(
            f"stage      {FUSED_STAGE}: not in this artifact (compiled before the fused graph); served as three stages"
        )
    lines.append(f"parity     max |err| {manifest.max_parity_error():.2e} (tolerance {manifest.parity_tolerance:.0e})")
    lines.append(f"files      {len(manifest.files) + 1} verified by sha256")
    if manifest.signature is not None:
        lines.append(f"signature  {manifest.signature.describe()}")
    return lines


def _signature(spec: StageSpec) -> str:
    ins = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.inputs)
    outs = ", ".join(f"{t.name}{list(t.shape)}" for t in spec.outputs)
    return f"({ins}) -> ({outs})"


def _users_width(spec: StageSpec) -> int:
    return max(len(",".join(map(str, spec.user_batch_sizes(b)))) for b in spec.batch_sizes)


def _worst(errors) -> float:
    errors = list(errors)
    return float("nan") if any(math.isnan(e) for e in errors) else max(errors)
