"""The real daemon as a process (`edgeagent serve`) on the real CPU engine, for the tests that
need its signals, its processes or its exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO
from waits import HANG_S

from edgeagent.client import Client
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    target: str
    log: Path

    @property
    def admin_target(self) -> str:
        return self.target.replace("edgeagent.sock", "admin.sock")

    def children(self) -> list[int]:
        return children_of(self.process.pid)

    def descendants(self) -> list[int]:
        """Every live process below the daemon, children's children included."""
        found, frontier = [], self.children()
        while frontier:
            pid = frontier.pop()
            if is_zombie(pid):
                continue
            found.append(pid)
            frontier += children_of(pid)
        return found

    def engine_core(self) -> int:
        """The pid of vLLM's engine core process under the daemon (zombies not counted)."""
        names = {pid: Path(f"/proc/{pid}/comm").read_text() for pid in self.children()}
        cores = [pid for pid, name in names.items()
                 if name.startswith("VLLM::EngineCor") and not is_zombie(pid)]  # fmt: skip
        assert len(cores) == 1, cores
        return cores[0]

    def wait(self, within_s: float) -> int:
        try:
            return self.process.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"daemon still running after {within_s} s; log:\n{self.tail()}"
            ) from None

    def terminate(self, within_s: float) -> int:
        """SIGTERM, then its exit code; one still running after `within_s` is killed (and
        reaped, so no test leaves a process behind) and the test fails."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(within_s)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


def start_daemon(
    tmp_path: Path, grace_s: float, served: Path | None = None, **extra_env: str
) -> RunningDaemon:
    """A daemon whose store holds `served` as current; with None, an empty store."""
    if served is not None:
        store = ModelStore(tmp_path / "state" / "models")
        store.activate(store.import_directory(served, ImportSource(origin=str(served))).version)
    env = {
        **os.environ,
        "EDGEAGENT_CONFIG": str(tmp_path / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(tmp_path / "state"),
        "EDGEAGENT_CACHE_DIR": str(REPO / ".cache"),  # shares the tests' compile cache
        "EDGEAGENT_RUNTIME_DIR": str(tmp_path / "run"),
        "EDGEAGENT_MODEL__KV_CACHE_GIB": "0.25",
        # These daemons update between random-weight models, which the quality gate refuses (it
        # has its own tests: tests/test_updates.py and the fast tier).
        "EDGEAGENT_UPDATES__QUALITY_GATE": "false",
        "EDGEAGENT_SERVER__DRAIN_GRACE_S": str(grace_s),
        **extra_env,
    }
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    daemon = RunningDaemon(process, f"unix:{tmp_path / 'run' / 'edgeagent.sock'}", log)
    with Client(daemon.target) as client:
        try:
            client.wait_until_serving(timeout=HANG_S, daemon=process)
        except (RuntimeError, TimeoutError) as error:
            process.kill()
            process.wait()
            raise AssertionError(f"{error}; log:\n{daemon.tail()}") from None
    return daemon


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):  # the process itself may be gone
        for task in Path(f"/proc/{pid}/task").iterdir():
            # A thread can end between the listing and the read.
            with contextlib.suppress(FileNotFoundError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
