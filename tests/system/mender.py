"""Debian's Mender client, standalone, in a booted system: its configuration, artifacts of
edgeagent's update module (`edgeagent mender-artifact`), `mender install`, `commit` and
`rollback` as an operator runs them, and apps that stream through it all."""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from waits import HANG_S

from system.booted import BootedSystem

DEVICE_TYPE = "edgeagent-test-box"
FACTORY_ARTIFACT = "factory-image"
MODULE = "/usr/share/mender/modules/v3/edgeagent-model"


def set_up_mender(system: BootedSystem) -> None:
    """The least a standalone client needs: a configuration, the device type and the name of
    what the device runs. Debian links /var/lib/mender to /data/mender."""
    system.write("/etc/mender/mender.conf", "{}\n")
    system.write("/etc/mender/artifact_info", f"artifact_name={FACTORY_ARTIFACT}\n")
    system.write("/data/mender/device_type", f"device_type={DEVICE_TYPE}\n")


def mender(system: BootedSystem, *args: str) -> subprocess.CompletedProcess[str]:
    # Only a hang guard: install and rollback wait for a killed daemon to serve again.
    return system.run("mender", "--no-syslog", *args, check=False, timeout=3 * HANG_S)


def module_journal(system: BootedSystem, since: str) -> str:
    """What the update module logged (Mender 3 drops a module's stderr) since `since`."""
    return system.run("journalctl", "--no-pager", "-o", "cat", "-t", "edgeagent-mender",
                      "--since", since).stdout  # fmt: skip


def now(system: BootedSystem) -> str:
    return system.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()


def installed_artifact(system: BootedSystem) -> str:
    return mender(system, "show-artifact").stdout.strip()


def write_artifact(system: BootedSystem, model_dir: Path, name: str) -> str:
    """An artifact of a model directory on the host, by the CLI inside the system."""
    inner = f"/root/models/{name}"
    shutil.copytree(model_dir, system.path(inner))
    output = f"/root/{name}.mender"
    system.cli("mender-artifact", inner, "-o", output, "-t", DEVICE_TYPE, "-n", name)
    return output


def with_release_notes(model_dir: Path, out: Path, notes: str) -> Path:
    """The same weights with a file added: another version that answers exactly as the first."""
    shutil.copytree(model_dir, out)
    (out / "RELEASE_NOTES.md").write_text(notes)
    return out


def with_shuffled_head(model_dir: Path, out: Path) -> Path:
    """Same layout, other answers: the output rows permuted, so the top token moves on almost
    every position (the quality gate's agreement falls to chance)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    for weights in out.glob("*.safetensors"):
        tensors = load_file(weights)
        for name, tensor in tensors.items():
            if name.endswith("lm_head.weight"):
                order = torch.randperm(tensor.shape[0], generator=torch.Generator().manual_seed(7))
                tensors[name] = tensor[order].contiguous()
        weights.unlink()
        save_file(tensors, weights, metadata={"format": "pt"})
    return out


@dataclass
class Apps:
    """Clients generating in a loop as the `app` user, each request a new CLI process."""

    system: BootedSystem
    clients: int = 2
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Apps:
        for i in range(self.clients):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=HANG_S)

    def _loop(self, client: int) -> None:
        while not self._stop.is_set():
            done = self.system.cli("generate", f"App {client} says", "--max-tokens", "16",
                                   user="app", check=False)  # fmt: skip
            if done.returncode == 0:
                self.completed += 1
            else:
                self.failures.append(done.stderr.strip()[-300:])
