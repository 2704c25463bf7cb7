"""How much memory the device that will hold the model has: the GPU through NVML, else system RAM.

The fit check takes a `MemoryProbe`; tests hand it a fake one. `NvmlProbe` reads the first GPU
this process may use (the first of `CUDA_VISIBLE_DEVICES`); `SystemMemoryProbe` reads
`/proc/meminfo` for vLLM's CPU build, where weights and KV cache live in RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from edgeagent.errors import ConfigError


@dataclass(frozen=True)
class DeviceMemory:
    kind: Literal["gpu", "cpu"]
    name: str
    total_bytes: int
    free_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


class MemoryProbe(Protocol):
    def read(self) -> DeviceMemory: ...


class NvmlProbe:
    def __init__(self, index: int | None = None) -> None:
        self.index = _visible_index() if index is None else index

    def read(self) -> DeviceMemory:
        import pynvml

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            raise ConfigError(f"NVML is not usable here: {error}") from None
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            return DeviceMemory(
                kind="gpu",
                name=name.decode() if isinstance(name, bytes) else str(name),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
            )
        finally:
            pynvml.nvmlShutdown()


class SystemMemoryProbe:
    def __init__(self, meminfo: Path = Path("/proc/meminfo")) -> None:
        self.meminfo = meminfo

    def read(self) -> DeviceMemory:
        fields = {}
        for line in self.meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024  # kB
        return DeviceMemory(
            kind="cpu",
            name="system memory",
            total_bytes=fields["MemTotal"],
            free_bytes=fields["MemAvailable"],
        )


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host memory available to new allocations (MemAvailable), whatever the device."""
    return SystemMemoryProbe(meminfo).read().free_bytes


def default_probe() -> MemoryProbe:
    """NVML when a GPU is visible, else system memory (vLLM's CPU build)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no device: all mean "no GPU here"
        return SystemMemoryProbe()
    return NvmlProbe() if count > 0 else SystemMemoryProbe()


def _visible_index() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0
