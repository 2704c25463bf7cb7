"""Named points where a test can have the daemon killed, to prove recovery from each.

`EDGEAGENT_FAILPOINT=update.loading` makes the process SIGKILL itself when it reaches the point
of that name; `NAME:N` at its N-th arrival there (a point start-up passes too). etcd's gofail
and FoundationDB's buggify do the same for their state machines. Unset, a point costs one
comparison.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGEAGENT_FAILPOINT"
_NAME, _, _NTH = os.environ.get(ENV, "").partition(":")
_arrivals = 0


def failpoint(name: str) -> None:
    global _arrivals
    if name != _NAME:
        return
    _arrivals += 1
    if _arrivals >= int(_NTH or 1):
        os.kill(os.getpid(), signal.SIGKILL)
