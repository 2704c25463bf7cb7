"""A real systemd, booted as PID 1 on a private root, for the tests of the unit and the role.

`boot-systemd.sh` makes the root: a tmpfs with /etc, /var and /root as overlays (writes vanish
with it), fresh /tmp and /run, the host's /usr bound read-only, and the checkout bound in, all
in new mount, PID and network namespaces. Booted on the host's own root instead, systemd's
boot-time tmpfiles once emptied the host's /tmp: `booted()` checks a canary file there before
it returns and fails the test if it is gone. It stops the system by SIGKILL to its PID (the
namespaces and mounts go with it), never by name.

Inside, edgeagent runs from this checkout and its virtualenv: `/opt/edgeagent/venv` is a
virtualenv on the system's /usr/bin/python3 whose site-packages point at the checkout's, so
the unit (which cannot see /root, where the checkout's own Python may live) runs the code
under test with every package the tests use.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import REPO
from waits import HANG_S, wait_until

BOOT = Path(__file__).with_name("boot-systemd.sh")
ROOTS = Path("/var/tmp/edgeagent-system")  # never under /tmp: see the module's docstring
VENV = "/opt/edgeagent/venv"
EDGEAGENT = f"{VENV}/bin/edgeagent"
T = TypeVar("T")
NEEDS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nsenter"),
    reason="boots systemd in new namespaces: needs root and util-linux",
)


def inside(host_path: Path) -> str:
    """Where a host directory is bound inside a booted system: at the same path, except under
    /tmp, which the booted system gets fresh (and which the unit sees privately)."""
    resolved = host_path.resolve()
    if resolved.is_relative_to("/tmp"):
        return f"/srv/edgeagent-binds{resolved}"
    return str(resolved)


REPO_INSIDE = inside(REPO)


@dataclass
class BootedSystem:
    pid: int  # systemd's, as the host sees it

    def path(self, inner: str) -> Path:
        """A path inside the booted system, reachable from the host."""
        return Path(f"/proc/{self.pid}/root{inner}")

    def command(self, *argv: str, user: str | None = None) -> list[str]:
        as_user = ["runuser", "-u", user, "--"] if user else []
        return ["nsenter", "-t", str(self.pid), "-a", "--", *as_user, *argv]

    def run(
        self, *argv: str, user: str | None = None, check: bool = True, timeout: float = HANG_S,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        done = subprocess.run(
            self.command(*argv, user=user), capture_output=True, text=True, timeout=timeout,
            input=input, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"`{shlex.join(argv)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def popen(self, *argv: str, network_only: bool = False) -> subprocess.Popen[str]:
        """A process in the system's network namespace only (it sees the host's files), or in
        all of its namespaces."""
        prefix = ["nsenter", "-t", str(self.pid), "-n", "--"] if network_only else self.command()
        return subprocess.Popen(
            [*prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, prop: str, unit: str = "edgeagent") -> str:
        return self.systemctl("show", unit, "-p", prop, "--value").stdout.strip()

    def served_version(self) -> str:
        """The version `edgeagent status` says the daemon serves; "" while it serves none."""
        status = self.cli("status", check=False).stdout
        match = re.search(r"^serving\s+\S+ (\S+) \(", status, re.MULTILINE)
        return match.group(1) if match else ""

    @contextlib.contextmanager
    def hub(self, port: int, *specs: str) -> Iterator[list[str]]:
        """The loopback hub (`tests/hub_server.py`) in this system's network namespace, each
        spec `ORG/NAME=MODEL_DIR` one commit; yields the commits; killed on the way out."""
        server = self.popen(sys.executable, str(REPO / "tests/hub_server.py"), str(port), *specs,
                            network_only=True)  # fmt: skip
        try:
            assert server.stdout is not None
            words = server.stdout.readline().split()
            assert words[:2] == ["serving", f"http://127.0.0.1:{port}"], words
            yield words[2:]
        finally:
            server.kill()
            server.communicate()

    def journal(self, *args: str, unit: str = "edgeagent") -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, *args).stdout

    def write(self, inner: str, text: str, mode: int = 0o644) -> None:
        target = self.path(inner)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def cli(self, *args: str, user: str | None = None, check: bool = True,
            timeout: float = HANG_S) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return self.run(EDGEAGENT, *args, user=user, check=check, timeout=timeout)


def ansible_interpreter(system: BootedSystem, directory: Path, name: str) -> Path:
    """A Python for Ansible's local connection that runs inside `system` (`directory` must be
    one the system shares with the host, as Ansible's remote temporary directory must)."""
    wrapper = directory / f"python-{name}"
    wrapper.write_text(f'#!/bin/sh\nexec nsenter -t {system.pid} -a /usr/bin/python3 "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def wait_for(what: str, probe: Callable[[], T | None], every_s: float = 0.5) -> T:
    """Poll until `probe` returns something true; only a hang guard (HANG_S) bounds it. Half a
    second between polls: each probe runs a command inside the booted system."""
    return wait_until(what, probe, every_s)


@contextlib.contextmanager
def booted(name: str, shared: Path | None = None) -> Iterator[BootedSystem]:
    """A booted systemd with this checkout inside and edgeagent's interpreter installed; killed
    on the way out, whatever happened. Fails if the host's /tmp lost its canary file. `shared`
    (a host directory outside /tmp) is bound in at its own path."""
    ROOTS.mkdir(parents=True, exist_ok=True)
    canary = Path("/tmp") / f"edgeagent-canary-{uuid.uuid4().hex}"
    canary.write_text("the host's /tmp must survive a booted systemd\n")
    root = ROOTS / f"{name}-{uuid.uuid4().hex[:8]}"
    binds = {REPO: REPO_INSIDE, Path(sys.prefix): inside(Path(sys.prefix))}
    if shared is not None:
        binds[shared] = str(shared)
    booting = subprocess.run(
        ["bash", str(BOOT)], capture_output=True, text=True, timeout=HANG_S, check=False,
        env={**os.environ, "SDROOT": str(root),
             "SDBINDS": " ".join(f"{src.resolve()}:{dst}" for src, dst in binds.items())},
    )  # fmt: skip
    assert booting.returncode == 0, booting.stderr
    system = BootedSystem(int(booting.stdout.strip()))
    try:
        wait_for("the booted system running", lambda: _settled(system))
        _install_interpreter(system)
        yield system
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(system.pid, signal.SIGKILL)
        _wait_gone(system.pid)
        with contextlib.suppress(OSError):
            root.rmdir()
            Path(f"{root}.boot.log").unlink()
        assert canary.exists(), "the host's /tmp was emptied while a systemd was booted"
        canary.unlink()


def _settled(system: BootedSystem) -> bool:
    state = system.systemctl("is-system-running", check=False).stdout.strip()
    return state in {"running", "degraded"}


def _wait_gone(pid: int) -> None:
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)


def _install_interpreter(system: BootedSystem) -> None:
    site_packages = sysconfig.get_path("purelib")
    system.run("/usr/bin/python3", "-m", "venv", "--without-pip", VENV)
    inner_site = system.run(
        f"{VENV}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"
    ).stdout.strip()
    system.write(
        f"{inner_site}/edgeagent-checkout.pth",
        f"{REPO_INSIDE}\nimport site; site.addsitedir({inside(Path(site_packages))!r})\n",
    )
    # vLLM starts its engine core by `spawn`, which imports the main script again: it must
    # not run the command on import.
    system.write(
        EDGEAGENT,
        f"#!{VENV}/bin/python\nimport sys\n\nfrom edgeagent.cli import main\n\n"
        'if __name__ == "__main__":\n    sys.exit(main())\n',
        mode=0o755,
    )
