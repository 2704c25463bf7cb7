"""The one launcher of `edgeagent serve` the benchmarks share: a daemon in a new process with
its state, cache and runtime directories given, no config file, the given EDGEAGENT_* settings,
and its output in WORKDIR/daemon.log. The sockets are WORKDIR/run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeagent.client import Client


@dataclass(frozen=True)
class Launched:
    process: subprocess.Popen[bytes]
    workdir: Path
    env: dict[str, str]  # the daemon's environment, for other `edgeagent` commands beside it

    @property
    def target(self) -> str:
        return f"unix:{self.workdir / 'run' / 'edgeagent.sock'}"

    @property
    def admin_target(self) -> str:
        return f"unix:{self.workdir / 'run' / 'admin.sock'}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self, timeout_s: float) -> None:
        """Until the daemon serves; exits naming the log if it stops or takes too long."""
        with Client(self.target) as client:
            try:
                client.wait_until_serving(timeout=timeout_s, daemon=self.process)
            except (RuntimeError, TimeoutError) as error:
                raise SystemExit(f"{error}; see {self.log_path}") from None

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM (the daemon drains, then exits); its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


def launch(
    workdir: Path, state_dir: Path, cache_dir: Path, settings: Mapping[str, str] | None = None
) -> Launched:
    env = {
        **os.environ,
        "EDGEAGENT_CONFIG": str(workdir / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(state_dir),
        "EDGEAGENT_CACHE_DIR": str(cache_dir),
        "EDGEAGENT_RUNTIME_DIR": str(workdir / "run"),
        **(settings or {}),
    }
    with (workdir / "daemon.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "serve"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Launched(process, workdir, env)
