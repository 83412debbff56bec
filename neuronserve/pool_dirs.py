"""A pool's private directory for its workers' Unix sockets: mode 0700 under the temporary directory, named
with the supervisor's pid. The supervisor removes it when it exits; one whose supervisor was killed
(SIGKILL, OOM) is removed by the next pool that starts on the host, so they do not pile up."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

PREFIX = "neuronserve-pool-"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")


def new_socket_dir() -> str:
    """A fresh 0700 directory for this pool, after removing the stale ones (remove_stale)."""
    remove_stale(tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def remove_stale(parent: str) -> list[str]:
    """Remove this user's pool directories in `parent` whose supervisor (the pid in the name) is gone;
    the removed paths. A directory with no pid in its name (an older neuronserve's) is left alone."""
    removed = []
    for entry in os.scandir(parent):
        match = _NAME.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
            continue
        if not _alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
