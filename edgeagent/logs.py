"""Logging for a terminal or for journald.

Under systemd with stderr connected to the journal (`$JOURNAL_STREAM` names stderr's device and
inode), each line starts with its syslog priority (`<6>` info, `<4>` warning, `<3>` error), so
`journalctl -p warning -u edgeagent` filters by level; journald adds the time, pid and unit.
Elsewhere lines carry a timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`, the prefix on every line (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITIES.get(record.levelno, 2 if record.levelno > logging.ERROR else 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def journal_connected(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal stream systemd set up for this service."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def setup_logging(level: str, stream: TextIO = sys.stderr) -> None:
    handler = logging.StreamHandler(stream)
    journal = journal_connected(stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TERMINAL_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
