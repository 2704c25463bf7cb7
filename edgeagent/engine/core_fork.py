"""vLLM's engine core process, forked from the daemon instead of spawned.

A spawned engine core is a fresh interpreter that imports vLLM and torch again (9 s of a 2-core
box's 36 s start on the embedded model) while nothing else runs. Forked, it starts with the
daemon's modules already imported. vLLM forks it by default, but its CPU platform asks for spawn
(for the worker the engine core starts, whose OpenMP threads must be bound when torch loads):
the engine core is forked and its worker is still spawned. Where CUDA is already initialized in
the daemon, vLLM spawns anyway.

A forked process inherits the daemon's state, of which four things are fixed in it, before
vLLM's code runs there (`multiprocessing.util.register_after_fork`): the wake-up descriptor of the
daemon's event loop (a signal to the engine core, such as vLLM's own SIGTERM at shutdown, would
otherwise arrive in the daemon's loop as the daemon's own), the warning filters (a fresh
interpreter's), the worker start method, and the plugins vLLM loads only once per process (the
orphan guard; the start steps' log hook is inherited).
"""

from __future__ import annotations

import contextlib
import os
import signal
import warnings
from collections.abc import Iterator
from multiprocessing import util

from edgeagent.engine import orphans
from edgeagent.timeline import record_step

METHOD_VARIABLE = "VLLM_WORKER_MULTIPROC_METHOD"  # vLLM's, for its engine core and workers


class _ForkedChild:
    """What a process forked from the daemon restores (a registration's key: must live on)."""

    armed = False  # only while the daemon starts an engine core: other forks keep their state
    worker_method: str | None = None

    def __call__(self) -> None:
        if not self.armed:
            return
        with contextlib.suppress(ValueError):  # only the main thread may; the forking one is
            signal.set_wakeup_fd(-1)
        if self.worker_method is None:
            os.environ.pop(METHOD_VARIABLE, None)
        else:
            os.environ[METHOD_VARIABLE] = self.worker_method
        _fresh_warning_filters()
        orphans.register()
        record_step("daemon: AsyncLLM set up, engine core forked")


def _fresh_warning_filters() -> None:
    """A fresh interpreter's filters: the daemon's own (a test runner's "error", say) would turn
    a library's DeprecationWarning into a failed request in the engine core."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)


_FORKED = _ForkedChild()
util.register_after_fork(_FORKED, _ForkedChild.__call__)


@contextlib.contextmanager
def forked_engine_core() -> Iterator[None]:
    """Around the start of vLLM's `AsyncLLM`, after its config was made (where the CPU platform
    sets the start method it wants for its workers)."""
    _FORKED.worker_method = os.environ.get(METHOD_VARIABLE)
    os.environ[METHOD_VARIABLE] = "fork"
    _FORKED.armed = True
    try:
        yield
    finally:
        _FORKED.armed = False
        if _FORKED.worker_method is None:
            os.environ.pop(METHOD_VARIABLE, None)
        else:
            os.environ[METHOD_VARIABLE] = _FORKED.worker_method
