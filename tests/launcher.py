"""The one launcher of the daemon as a process, shared by both test tiers and the benchmarks.

A daemon gets its state, cache and runtime directories, no config file (WORKDIR/absent.toml),
the given settings (EDGEAGENT_* and any other variables), and writes its output to
WORKDIR/<log_name>; its sockets are WORKDIR/run's. The command is `edgeagent serve` unless
given (the fast tier's `fast.fake_serve`: the same daemon with fake engines). The real tier
(`real_daemon.py`) and the fast tier (`fast/runner.py`) add their own settings on top; the
benchmarks (bench/, which put tests/ on their path) call `launch` directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeagent.client import Client

SERVE = (sys.executable, "-m", "edgeagent", "serve")


def socket_target(workdir: Path, name: str) -> str:
    """The gRPC target of a socket of a daemon launched in `workdir` (its runtime_dir is run/)."""
    return f"unix:{workdir / 'run' / name}"


@dataclass(frozen=True)
class Launched:
    process: subprocess.Popen[bytes]
    workdir: Path
    env: dict[str, str]  # the daemon's environment, for other `edgeagent` commands beside it
    log_path: Path

    @property
    def target(self) -> str:
        return socket_target(self.workdir, "edgeagent.sock")

    @property
    def admin_target(self) -> str:
        return socket_target(self.workdir, "admin.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_until_serving(self, timeout_s: float) -> None:
        """Until the daemon serves; one that exits or takes longer is killed (and reaped) and
        the log's tail raised."""
        with Client(self.target) as client:
            try:
                client.wait_until_serving(timeout=timeout_s, daemon=self.process)
            except (RuntimeError, TimeoutError) as error:
                self.kill()
                raise AssertionError(f"{error}; {self.log_path}:\n{self.tail()}") from None

    def wait(self, within_s: float) -> int:
        """Its exit code; one still running after `within_s` is killed (and reaped, so nothing
        is left behind) and the log's tail raised."""
        try:
            return self.process.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"daemon still running after {within_s} s; log:\n{self.tail()}"
            ) from None

    def terminate(self, within_s: float = 120) -> int:
        """SIGTERM (the daemon drains, then exits), then its exit code, as `wait`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(within_s)

    def kill(self) -> None:
        """SIGKILL and reap, if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

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


def daemon_environment(
    workdir: Path, state_dir: Path, cache_dir: Path, settings: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The daemon's own variables (not the inherited environment): its directories, no config
    file, then `settings`."""
    return {
        "EDGEAGENT_CONFIG": str(workdir / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(state_dir),
        "EDGEAGENT_CACHE_DIR": str(cache_dir),
        "EDGEAGENT_RUNTIME_DIR": str(workdir / "run"),
        **(settings or {}),
    }


def launch(
    workdir: Path, state_dir: Path, cache_dir: Path, settings: Mapping[str, str] | None = None,
    *, command: Sequence[str] = SERVE, log_name: str = "daemon.log",
) -> Launched:  # fmt: skip
    """The daemon started (not waited for: see `Launched.wait_until_serving`)."""
    env = {**os.environ, **daemon_environment(workdir, state_dir, cache_dir, settings)}
    log_path = workdir / log_name
    with log_path.open("wb") as log:
        process = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT)
    return Launched(process, workdir, env, log_path)


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
