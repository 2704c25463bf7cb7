"""The start timeline: where the seconds from process start to serving went, phase by phase.

Logged as one table when the daemon is ready and kept for `edgeagent status`, so a slow start
on a box in the field says which phase was slow (imports, verification, the engine, warm-up)
without a profiler. The first phase starts when the kernel started the process, not when
Python reached our code, so the interpreter's and the imports' seconds are counted too.

The engine's own steps happen in other processes (vLLM's engine core and its worker). Each
process below the daemon appends the steps it finishes to a file the daemon names in
`STEPS_VARIABLE` (`record_step`), on CLOCK_MONOTONIC, which every process on the machine shares;
the phase during which they happened is then shown with them as its sub-steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

STEPS_VARIABLE = "EDGEAGENT_START_STEPS"
SUBSTEP_INDENT = "  "  # a sub-step's name in `rows`: indented under the phase it belongs to
REST = "(the rest of the phase)"


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


def record_step(name: str, at: float | None = None) -> None:
    """Step `name` ended `at` (now by default), in any process started while the daemon's
    first start collects steps; elsewhere nothing. One append of one short line: the lines of
    several processes do not interleave."""
    path = os.environ.get(STEPS_VARIABLE)
    if not path:
        return
    line = f"{time.monotonic() if at is None else at:.6f}\t{name}\n".encode()
    try:  # no O_CREAT: once the daemon has removed the file, late steps are dropped
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def read_steps(path: Path) -> list[tuple[float, str]]:
    """The steps recorded in `path`, in the order they ended."""
    try:
        text = path.read_text()
    except OSError:
        return []
    steps = []
    for line in text.splitlines():
        at, _, name = line.partition("\t")
        try:
            steps.append((float(at), name))
        except ValueError:
            continue  # a line cut short by a process killed while writing it
    return sorted(steps)


@dataclass
class StartTimeline:
    """Phases in the order they ended, each with its seconds since the phase before, and the
    steps recorded during each (`substeps`, by phase index) summing to it."""

    origin: float = field(default_factory=process_started_monotonic)
    phases: list[tuple[str, float]] = field(default_factory=list)
    substeps: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    _last: float | None = None
    _steps_file: Path | None = None

    def collect_steps(self, path: Path) -> None:
        """From now on, processes started from this one record their steps in `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        self._steps_file = path
        os.environ[STEPS_VARIABLE] = str(path)

    def stop_collecting(self) -> None:
        """Engines started later (updates) are not part of the start: they record nothing."""
        os.environ.pop(STEPS_VARIABLE, None)
        if self._steps_file is not None:
            self._steps_file.unlink(missing_ok=True)
            self._steps_file = None

    def mark(self, phase: str) -> None:
        """`phase` has just ended: it took the time since the previous mark (or the start)."""
        self._close(phase, time.monotonic())

    def split(self, first: str, first_s: float, rest: str) -> None:
        """Two phases have just ended: `first`, timed elsewhere (inside the engine loader) at
        `first_s`, and `rest`, the remainder since the previous mark."""
        now = time.monotonic()
        first_s = min(max(0.0, first_s), now - self._start())
        self._close(first, self._start() + first_s)
        self._close(rest, now)

    def _start(self) -> float:
        return self._last if self._last is not None else self.origin

    def _close(self, phase: str, end: float) -> None:
        start = self._start()
        steps = self._steps_within(start, end)
        if steps:
            self.substeps[len(self.phases)] = steps
        self.phases.append((phase, end - start))
        self._last = end

    def _steps_within(self, start: float, end: float) -> list[tuple[str, float]]:
        """The recorded steps that ended inside (start, end], each with its seconds since the
        step before (or `start`), and the rest of the phase after the last of them."""
        if self._steps_file is None:
            return []
        inside = [(at, name) for at, name in read_steps(self._steps_file) if start < at <= end]
        if not inside:
            return []
        befores = [start, *(at for at, _ in inside[:-1])]
        steps = [(name, at - before) for (at, name), before in zip(inside, befores, strict=True)]
        return [*steps, (REST, end - inside[-1][0])]

    @property
    def total_s(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    @property
    def rows(self) -> list[tuple[str, float]]:
        """Each phase followed by its sub-steps, indented by `SUBSTEP_INDENT`."""
        rows = []
        for index, phase in enumerate(self.phases):
            rows.append(phase)
            rows += [(SUBSTEP_INDENT + name, s) for name, s in self.substeps.get(index, [])]
        return rows

    def table(self) -> str:
        rows = self.rows
        width = max([len("total"), *(len(name) for name, _ in rows)])
        lines = [f"  {name:<{width}}  {seconds:7.2f} s" for name, seconds in rows]
        return "\n".join([*lines, f"  {'total':<{width}}  {self.total_s:7.2f} s"])
