"""vLLM's CPU worker forked from a server that imports torch and vLLM beside the daemon.

On CPU, vLLM runs the model in a worker process it spawns: a fresh interpreter that imports
torch and vLLM (about 7 s of a warm 21 s start on 2 cores) after the daemon has imported them,
in series. Here a fork server (multiprocessing's) starts when the engine start begins and
imports them while the daemon imports its own; vLLM's worker is then forked from it, its
imports done.

The OpenMP runtime, and a few libraries like it, read their environment once, when torch loads,
and vLLM sets that environment just before it starts the worker: the thread binding
(`GOMP_CPU_AFFINITY`, `OMP_NUM_THREADS`), `LD_PRELOAD`, Inductor's thread counts. A worker
forked with another binding decoded at 0.7x (docs/benchmarks.md). So the server starts with
the environment the worker had the last time, recorded in the cache directory as its
differences from the daemon's; when vLLM starts the worker, the environment it has set must
equal the server's in every variable (but `LATE_VARIABLES`, read later, and applied in the
worker), or the worker is spawned as vLLM would and the record is updated for the next start.
The first start on a box therefore spawns, and every later one (a restart, a reboot) forks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing import (
    connection,
    forkserver,
    popen_spawn_posix,
    reduction,
    resource_tracker,
    spawn,
)
from multiprocessing import util as mp_util
from multiprocessing.context import SpawnContext, SpawnProcess, set_spawning_popen
from multiprocessing.popen_forkserver import Popen as ForkServerPopen
from pathlib import Path
from typing import Any

from edgeagent.store.durable import write_durably
from edgeagent.timeline import STEPS_VARIABLE

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
# What a spawned worker imports before it runs: vLLM's worker entry point and the CPU worker.
PRELOAD = (
    "torch",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.cpu_worker",
    __name__,  # the worker's process class, unpickled in the worker
)
LATE_VARIABLES = frozenset({STEPS_VARIABLE})  # read when used, not when a library loads

_base: dict[str, str] | None = None  # the daemon's environment when the engine start began
_record: Path | None = None
_server: _Server | None = None
_retired: list[_Server] = []  # closed by the daemon, still held by an engine core
forked_from_server = False  # in a worker: whether it came from the server (the start steps)


class _Server(forkserver.ForkServer):
    """A fork server started with a given environment and the worker's imports, owned by the
    daemon; engine cores forked from the daemon share it."""

    def __init__(self, environ: dict[str, str], preload: Sequence[str]) -> None:
        super().__init__()
        self.environ = environ
        self._preload_modules = list(preload)
        self._owner = os.getpid()
        self._process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """multiprocessing's own start of a fork server, in another environment."""
        resource_tracker.ensure_running()
        command = "from multiprocessing.forkserver import main; main(%d, %d, %r, **%r)"
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()  # it ends once every holder of alive_w has closed it
            try:
                command %= (listener.fileno(), alive_r, self._preload_modules,
                            {"sys_path": sys.path})  # fmt: skip
                arguments = [spawn.get_executable(), *mp_util._args_from_interpreter_flags()]  # type: ignore[attr-defined]
                self._process = subprocess.Popen(
                    [*arguments, "-c", command], env=self.environ,
                    pass_fds=(listener.fileno(), alive_r), stdin=subprocess.DEVNULL,
                )  # fmt: skip
            except BaseException:
                os.close(alive_w)
                raise
            finally:
                os.close(alive_r)
        self._forkserver_address = address
        self._forkserver_alive_fd = alive_w
        self._forkserver_pid = self._process.pid

    def ensure_running(self) -> None:
        """Never starts another: a server that has gone makes the worker's start fail, which
        `alive` lets its caller avoid."""
        resource_tracker.ensure_running()

    def alive(self) -> bool:
        if self._forkserver_pid is None:
            return False
        if os.getpid() == self._owner and self._process is not None:
            return self._process.poll() is None
        try:  # an engine core forked from the daemon: the server is its sibling
            os.kill(self._forkserver_pid, 0)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """The daemon's side: the server ends once no engine core holds it any more either."""
        if os.getpid() != self._owner or self._forkserver_alive_fd is None:
            return
        os.close(self._forkserver_alive_fd)
        self._forkserver_alive_fd = None  # type: ignore[assignment]
        if self._forkserver_address and os.path.exists(self._forkserver_address):
            os.unlink(self._forkserver_address)  # no new connections

    def ended(self, within_s: float = 0.0) -> bool:
        """Whether the server process has exited (reaped), waiting up to `within_s`."""
        if self._process is None:
            return True
        try:
            self._process.wait(within_s)
        except subprocess.TimeoutExpired:
            return False
        return True


def prepare(record: Path | None, preload: Sequence[str] = PRELOAD) -> None:
    """At the start of an engine start, before vLLM is imported: start the server with the
    environment the worker had last time (kept when it is running with that one already).
    `record`: where that environment is kept; None leaves vLLM to spawn its worker."""
    global _base, _record, _server
    _base, _record = dict(os.environ), record
    wanted = _recorded_environment(record, _base) if record is not None else None
    if _server is not None and (wanted is None or _server.environ != wanted or not _server.alive()):
        _retire()  # an engine beside this start may still hold it: not waited for
    # Python 3.13 changed the server's protocol (an authentication key): spawned there.
    if wanted is not None and _server is None and sys.version_info < (3, 13):
        server = _Server(wanted, preload)
        try:
            server.launch()
        except OSError as error:
            logger.warning("the CPU worker's fork server did not start (%s): spawning it", error)
            return
        _server = server


def stop(within_s: float = 5.0) -> None:
    """The daemon's side, once its engines are shut down: the servers end."""
    _retire()
    for server in _retired:
        if not server.ended(within_s) and server._process is not None:
            server._process.kill()
            server.ended(within_s)
    _retired.clear()


def _retire() -> None:
    global _server
    if _server is not None:
        _server.close()
        _retired.append(_server)
        _server = None
    _retired[:] = [server for server in _retired if not server.ended()]


def install(executor_module: Any) -> None:
    """After vLLM's import, in the daemon (its engine cores are forked from it): vLLM's executor
    takes its worker's process from here where it would spawn it."""
    current = executor_module.get_mp_context
    original = getattr(current, "__wrapped__", current)

    def get_mp_context() -> Any:
        context = original()
        return _CONTEXT if context.get_start_method() == "spawn" and _base is not None else context

    get_mp_context.__wrapped__ = original  # type: ignore[attr-defined]
    executor_module.get_mp_context = get_mp_context


def _recorded_environment(record: Path, base: dict[str, str]) -> dict[str, str] | None:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not _is_record(data):
        logger.warning("ignoring %s: not a worker environment record", record)
        return None
    environ = {k: v for k, v in base.items() if k not in data["unset"]}
    environ.update(data["set"])
    return environ


def _is_record(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and data.get("format") == RECORD_FORMAT
        and isinstance(data.get("set"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in data["set"].items())
        and isinstance(data.get("unset"), list)
        and all(isinstance(k, str) for k in data["unset"])
    )


def _remember(environ: dict[str, str]) -> None:
    """The worker's environment as differences from the daemon's, for the next start."""
    if _record is None or _base is None:
        return
    data = {
        "format": RECORD_FORMAT,
        "set": {k: v for k, v in sorted(environ.items()) if _base.get(k) != v},
        "unset": sorted(k for k in _base if k not in environ),
    }
    text = json.dumps(data, indent=1) + "\n"
    try:
        if _record.is_file() and _record.read_text() == text:
            return
        _record.parent.mkdir(parents=True, exist_ok=True)
        write_durably(_record, text.encode())
    except OSError as error:
        logger.warning("could not record the CPU worker's environment in %s: %s", _record, error)


def _mismatch(environ: dict[str, str]) -> str:
    """Why the server cannot give this worker ("" when it can)."""
    if _server is None:
        return "no fork server (the first start, or the worker's environment was not recorded)"
    if not _server.alive():
        return "the fork server has exited"
    differ = sorted(
        k for k in set(environ) | set(_server.environ)
        if k not in LATE_VARIABLES and environ.get(k) != _server.environ.get(k)
    )  # fmt: skip
    return f"its environment differs in {', '.join(differ)}" if differ else ""


class _ServerPopen(ForkServerPopen):
    """multiprocessing's forkserver Popen, on our server rather than the global one."""

    def _launch(self, process_obj: Any) -> None:
        assert _server is not None
        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = _server.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        _parent_w = os.dup(w)  # the child's sentinel of this parent, as in CPython
        self.finalizer = mp_util.Finalize(
            self,
            mp_util.close_fds,  # type: ignore[attr-defined]
            (_parent_w, self.sentinel),
        )
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class WorkerProcess(SpawnProcess):
    """vLLM's worker process: forked from the server when the environment vLLM set for it is
    the server's, spawned otherwise."""

    _start_method = "spawn"  # to vLLM: not forked from the engine core (no inherited fds)

    def start(self) -> None:
        self.environ = dict(os.environ)
        _remember(self.environ)
        why_not = _mismatch(self.environ)
        self.from_server = not why_not
        if why_not:
            logger.info("spawning vLLM's CPU worker: %s", why_not)
        super().start()

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        if process_obj.from_server:
            return _ServerPopen(process_obj)
        return popen_spawn_posix.Popen(process_obj)

    def run(self) -> None:
        global forked_from_server
        if self.from_server:  # the server's environment, but for the late variables
            forked_from_server = True
            os.environ.clear()
            os.environ.update(self.environ)
        super().run()


class _WorkerContext(SpawnContext):
    Process = WorkerProcess


_CONTEXT = _WorkerContext()
