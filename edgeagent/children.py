"""Worker processes that must not outlive the process that started them: the embedded model's
training (`demo/train.py`) and the AutoRound run (`sources/build_worker.py`), each started as
`python -m MODULE ... PPID`."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """A killed edgeagent must not leave its worker running: ask Linux for SIGKILL on its death."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)
