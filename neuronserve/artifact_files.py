"""Reading an artifact's files: inside its directory, regular files only, one descriptor per read.

A leaf of artifact.py: every byte the runtime loads from an artifact comes through read_artifact_file,
so a symlink out of the directory, a device, a FIFO or an unreadable file is an ArtifactError naming the
path (one line, never a traceback), and what is hashed is what is loaded.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from neuronserve.errors import ArtifactError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def plain_file_name(name: str) -> bool:
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
    if not plain_file_name(name):
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


def path_exists(path: Path, follow: bool = False) -> bool:
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
