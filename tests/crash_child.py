"""Run a store operation and SIGKILL this process at its Nth file-system change.

Usage: crash_child.py STORE_ROOT NEW_MODEL_DIR KILL_AT  (KILL_AT 0: never; prints the count)

Every call that changes the file system (mkdir, link, symlink, rename, replace, fsync, chmod,
unlink, rmdir) is counted; at the KILL_AT-th the process kills itself before the call runs,
like a power cut or an OOM kill at that instant. The operation imports a new version, makes it
current, and runs gc, which covers commit, the refs switch and removal.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore

MUTATIONS = ("mkdir", "link", "symlink", "rename", "replace", "fsync", "chmod", "unlink", "rmdir")
count = 0


def counted(kill_at: int, call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global count
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(*args, **kwargs)

    return wrapper


def main(root: str, model: str, kill_at: int) -> None:
    store = ModelStore(Path(root))  # opened before counting: the store already exists
    for name in MUTATIONS:
        setattr(os, name, counted(kill_at, getattr(os, name)))
    manifest = store.import_directory(Path(model), ImportSource(origin=model))
    store.activate(manifest.version)
    store.gc(keep=0)
    print(count)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
