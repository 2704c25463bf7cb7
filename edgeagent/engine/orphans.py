"""No engine process outlives the daemon.

vLLM runs its engine core (and on some platforms its workers) in child processes. When the
daemon exits normally it stops them; when it is SIGKILLed (by systemd's watchdog, the OOM
killer, an operator's `kill -9`) nothing does: outside systemd, the children were seen still
running minutes later, and on a GPU they keep the model's memory, so the restarted daemon no
longer fits. Under systemd the unit's cgroup is killed whole; this covers every other case.

The daemon marks itself (`mark_daemon`) before it starts vLLM. vLLM loads this module's
`register` as a plugin (entry point `vllm.general_plugins`) in each of its processes; in a
process below the daemon it starts a thread that kills its own process once its parent or the
daemon is gone. A grandchild follows its parent down the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

logger = logging.getLogger(__name__)

DAEMON_PID_VARIABLE = "EDGEAGENT_DAEMON_PID"
POLL_INTERVAL_S = 0.5
_guard: threading.Thread | None = None


def mark_daemon() -> None:
    """Called by the daemon before it starts an engine: its children inherit the mark."""
    os.environ[DAEMON_PID_VARIABLE] = str(os.getpid())


def register() -> None:
    """vLLM's plugin hook: start the guard in a process below a marked daemon."""
    global _guard
    daemon_pid = _marked_daemon_pid()
    if daemon_pid is None or daemon_pid == os.getpid() or _guard is not None:
        return
    _guard = threading.Thread(
        target=_die_with, args=(os.getppid(), daemon_pid), name="edgeagent-orphan-guard",
        daemon=True,
    )  # fmt: skip
    _guard.start()


def _marked_daemon_pid() -> int | None:
    value = os.environ.get(DAEMON_PID_VARIABLE, "")
    return int(value) if value.isdigit() else None


def _die_with(parent_pid: int, daemon_pid: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_INTERVAL_S):
        if os.getppid() != parent_pid or not _alive(daemon_pid):
            logger.warning("the edgeagent daemon (pid %d) is gone; stopping this engine process",
                           daemon_pid)  # fmt: skip
            os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else (a reused pid: treat as gone)
        return False
    return True


def stop_resource_tracker() -> None:
    """Stop the helper process multiprocessing starts for vLLM's engine (and waits for it).
    Left to end on its own, it outlives the daemon by a moment, and under systemd
    (`KillMode=mixed`) every orderly stop ended with a SIGKILL to it in the journal. It is
    started again on demand if anything needs it later."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)  # private, in CPython since 3.8
    if stop is not None:
        stop()
