"""The start timeline: where the seconds from process start to serving went, phase by phase.

Logged as one table when the daemon is ready and kept for `edgeagent status`, so a slow start
on a box in the field says which phase was slow (imports, verification, the engine, warm-up)
without a profiler. The first phase starts when the kernel started the process, not when
Python reached our code, so the interpreter's and the imports' seconds are counted too.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


def process_started_monotonic() -> float:
    """When this process started, on `time.monotonic()`'s clock (Linux: from /proc; elsewhere
    the first call's time, which misses only the imports before it)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        started_ticks = int(fields[19])  # field 22, "starttime": clock ticks after boot
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):
        return time.monotonic()
    return time.monotonic() - max(0.0, age_s)


@dataclass
class StartTimeline:
    """Phases in the order they ended, each with its seconds since the phase before."""

    origin: float = field(default_factory=process_started_monotonic)
    phases: list[tuple[str, float]] = field(default_factory=list)
    _last: float | None = None

    def mark(self, phase: str) -> None:
        """`phase` has just ended: it took the time since the previous mark (or the start)."""
        now = time.monotonic()
        self.phases.append((phase, now - (self._last if self._last is not None else self.origin)))
        self._last = now

    def split(self, first: str, first_s: float, rest: str) -> None:
        """Two phases have just ended: `first`, timed elsewhere (inside the engine loader) at
        `first_s`, and `rest`, the remainder since the previous mark."""
        now = time.monotonic()
        elapsed = now - (self._last if self._last is not None else self.origin)
        first_s = min(first_s, elapsed)
        self.phases += [(first, first_s), (rest, elapsed - first_s)]
        self._last = now

    @property
    def total_s(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    def table(self) -> str:
        width = max([len("total"), *(len(name) for name, _ in self.phases)])
        rows = [f"  {name:<{width}}  {seconds:7.2f} s" for name, seconds in self.phases]
        return "\n".join([*rows, f"  {'total':<{width}}  {self.total_s:7.2f} s"])
