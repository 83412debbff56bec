"""The model repository: Triton's layout DIR/<model>/<integer version>/, each version an artifact.

Role: say which versions exist and which a version policy selects; nothing here loads or serves
(model_control.py does). Contract: a version is a directory named by a positive decimal integer below
2**63 (Triton's rule; "007" is refused rather than read as 7, so two spellings never name one version);
anything else in the model directory is listed in `ignored` with the reason, never an error. The
artifact's own content hash stays in its manifest (`model_version`) and is reported as metadata.
`--artifact DIR` is a one-version repository (Repository.of_artifact): version N when the artifact's
version is the integer N (compile --model-version N), else 1, as the OIP reported it before.

A policy is Triton's ModelVersionPolicy: latest N (default: latest 1), a specific list, or all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

from neuronserve.artifact import MANIFEST_NAME
from neuronserve.errors import ConfigError, NotFound

MAX_VERSION = 2**63 - 1
LATEST, SPECIFIC, ALL = "latest", "specific", "all"


def parse_version(text: str) -> int | None:
    """The integer version a directory name or request string names, or None: a positive decimal integer
    below 2**63 in canonical form (no sign, no leading zero)."""
    if not (text.isascii() and text.isdigit()) or text.startswith("0"):
        return None
    value = int(text)
    return value if 0 < value <= MAX_VERSION else None


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions to serve: the `latest` N, a `specific` list, or `all` of them."""

    kind: str = LATEST
    latest: int = 1  # kind latest: how many of the highest versions
    versions: tuple[int, ...] = ()  # kind specific: these versions (each must exist to be loaded)

    def __post_init__(self) -> None:
        if self.kind not in (LATEST, SPECIFIC, ALL):
            raise ConfigError(f"version policy must be latest, specific or all, got {self.kind!r}")
        if self.kind == LATEST and not (isinstance(self.latest, int) and self.latest >= 1):
            raise ConfigError(f"version policy latest needs a count >= 1, got {self.latest!r}")
        if self.kind == SPECIFIC:
            if not self.versions or any(not isinstance(v, int) or not 0 < v <= MAX_VERSION for v in self.versions):
                raise ConfigError(
                    f"version policy specific needs one or more positive integer versions, got {list(self.versions)}"
                )
            object.__setattr__(self, "versions", tuple(sorted(set(self.versions))))

    def select(self, available: Sequence[int]) -> tuple[int, ...]:
        """The versions of `available` this policy serves, ascending."""
        ordered = sorted(set(available))
        if self.kind == ALL:
            return tuple(ordered)
        if self.kind == LATEST:
            return tuple(ordered[-self.latest :])
        return tuple(v for v in ordered if v in self.versions)

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `all`, or `specific:1,3` (the --version-policy setting)."""
        kind, _, arg = str(text).strip().partition(":")
        kind = kind.strip().lower()
        try:
            if kind == LATEST:
                return cls(LATEST, latest=int(arg) if arg.strip() else 1)
            if kind == ALL and not arg.strip():
                return cls(ALL)
            if kind == SPECIFIC:
                return cls(SPECIFIC, versions=tuple(int(v) for v in arg.split(",") if v.strip()))
        except ValueError:
            pass
        raise ConfigError(f"version policy {text!r}: write latest, latest:N, all or specific:V1,V2 (integer versions)")

    @classmethod
    def from_triton(cls, data: dict) -> VersionPolicy:
        """Triton's model config JSON `version_policy`: {"latest": {"num_versions": N}}, {"all": {}} or
        {"specific": {"versions": [..]}} (what tritonclient's load_model(config=...) sends)."""
        if not isinstance(data, dict) or len(data) != 1:
            raise ConfigError(
                f"version_policy must hold exactly one of latest, all, specific; got {json.dumps(data)[:120]}"
            )
        ((kind, body),) = data.items()
        body = body if isinstance(body, dict) else {}
        try:
            if kind == LATEST:
                return cls(LATEST, latest=int(body.get("num_versions", 1)))
            if kind == ALL:
                return cls(ALL)
            if kind == SPECIFIC:
                return cls(SPECIFIC, versions=tuple(int(v) for v in body.get("versions", ())))
        except (TypeError, ValueError):
            pass
        raise ConfigError(
            f"version_policy {json.dumps(data)[:120]} is not latest/num_versions, all or specific/versions"
        )

    def __str__(self) -> str:
        if self.kind == LATEST:
            return f"latest:{self.latest}"
        return ALL if self.kind == ALL else f"specific:{','.join(map(str, self.versions))}"


@dataclass(frozen=True)
class VersionDir:
    """One version of a model in the repository: its integer and its artifact directory."""

    version: int
    path: Path

    @property
    def has_manifest(self) -> bool:
        return (self.path / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class ModelScan:
    """What a scan of one model directory found, and what the policy selects of it."""

    name: str
    available: tuple[VersionDir, ...]  # ascending by version
    selected: tuple[int, ...]  # ascending
    policy: VersionPolicy
    ignored: tuple[tuple[str, str], ...] = ()  # (entry name, why it is not a version)

    def path(self, version: int) -> Path:
        for entry in self.available:
            if entry.version == version:
                return entry.path
        raise NotFound(
            f"model {self.name} has no version {version} in the repository; it has {[e.version for e in self.available] or 'none'}"
        )

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(e.version for e in self.available)


@dataclass(frozen=True)
class Repository:
    """A model repository root, or one artifact standing in for a one-version repository."""

    root: Path
    single: tuple[str, int, Path] | None = field(default=None)  # --artifact: (model name, version, artifact dir)

    @classmethod
    def of_artifact(cls, artifact, model_name: str, artifact_version: str) -> Repository:
        """--artifact DIR as a repository: one model of one version (see the module docstring)."""
        path = Path(artifact)
        return cls(path.parent, (model_name, parse_version(artifact_version) or 1, path))

    def models(self) -> tuple[str, ...]:
        """The model directories, sorted (hidden entries skipped)."""
        if self.single is not None:
            return (self.single[0],)
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            raise ConfigError(f"model repository {self.root} does not exist") from None
        except NotADirectoryError:
            raise ConfigError(f"model repository {self.root} is not a directory (DIR/<model>/<version>/)") from None
        return tuple(e.name for e in entries if e.is_dir() and not e.name.startswith("."))

    def only_model(self) -> str:
        """The repository's one model (this server serves one two-tower scorer); a ConfigError otherwise."""
        models = self.models()
        if len(models) != 1:
            raise ConfigError(
                f"model repository {self.root} holds {len(models)} models ({', '.join(models) or 'none'}); "
                "neuronserve serves one two-tower scorer: give it a repository of one model directory, DIR/<model>/<version>/"
            )
        return models[0]

    def scan(self, model: str, policy: VersionPolicy = VersionPolicy()) -> ModelScan:
        """The versions of `model` on disk now and those `policy` selects. NotFound for an unknown model."""
        if self.single is not None:
            name, only, path = self.single
            if model != name:
                raise NotFound(f"unknown model {model!r}; this server's repository holds {name}")
            return ModelScan(name, (VersionDir(only, path),), policy.select([only]), policy)
        if model not in self.models():
            raise NotFound(
                f"unknown model {model!r}; the repository {self.root} holds {', '.join(self.models()) or 'nothing'}"
            )
        found: dict[int, VersionDir] = {}
        ignored = []
        for entry in sorted(os.scandir(self.root / model), key=lambda e: e.name):
            version = parse_version(entry.name)
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                ignored.append((entry.name, "not a directory"))
            elif version is None:
                ignored.append((entry.name, "not a positive integer version"))
            else:
                found[version] = VersionDir(version, Path(entry.path))
        available = tuple(found[v] for v in sorted(found))
        return ModelScan(model, available, policy.select(list(found)), policy, tuple(ignored))
