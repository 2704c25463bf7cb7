"""Progress for long jobs: a bar for people on a terminal, key=value lines in the log.

The job reports how far it is (`update(done)`); the log gets a line at most every
`log_every_s`, and the bar redraws at most every 0.2 s, so a tight loop can report freely.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

logger = logging.getLogger("edgeagent.progress")


class Progress:
    def __init__(
        self,
        job: str,
        total: int,
        *,
        unit: str = "B",
        log_every_s: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.job, self.total, self.unit = job, total, unit
        self.done = 0
        self.note = ""  # what the job says besides how far it is, e.g. a training loss
        self._log_every_s = log_every_s
        self._stream = stream if stream is not None else sys.stderr
        self._interactive = self._stream.isatty()
        self._started = self._last_log = self._last_draw = time.monotonic()
        self._started_at = 0

    def start_at(self, done: int) -> None:
        """Work already done before this run (a resumed download): not counted in the rate."""
        self.done = self._started_at = done

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            self._last_log = now
            logger.info("%s", self._fields())
        if self._interactive and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._draw()

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        if self._interactive:
            self._draw()
            self._stream.write("\n")
        logger.info("%s state=done elapsed_s=%.1f", self._fields(), self.elapsed_s)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def rate(self) -> float:
        return (self.done - self._started_at) / max(self.elapsed_s, 1e-9)

    def _fields(self) -> str:
        percent = 100 * self.done / self.total if self.total else 100.0
        return (
            f"job={self.job!r} done={self.done} total={self.total} unit={self.unit} "
            f"percent={percent:.1f} rate={self.rate:.4g}/s"
            + (f" note={self.note!r}" if self.note else "")
        )

    def _draw(self) -> None:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(30 * fraction)
        remaining = (self.total - self.done) / self.rate if self.rate > 0 else 0.0
        self._stream.write(
            f"\r{self.job} [{'#' * filled}{'.' * (30 - filled)}] {100 * fraction:5.1f}% "
            f"{_human(self.done, self.unit)}/{_human(self.total, self.unit)} "
            f"{_human(int(self.rate), self.unit)}/s ETA {remaining:4.0f} s "
            + (f"{self.note} " if self.note else "")
        )
        self._stream.flush()


def _human(amount: int, unit: str) -> str:
    if unit != "B":
        return f"{amount}"
    for suffix, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if amount >= scale:
            return f"{amount / scale:.1f} {suffix}"
    return f"{amount} B"
