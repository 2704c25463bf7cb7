"""systemd's notify protocol (sd_notify(3)): readiness, status, start-up time, watchdog, stop.

One datagram per message to `$NOTIFY_SOCKET`, a path or, with a leading `@`, an abstract
socket. Without `$NOTIFY_SOCKET` (not under systemd, or `Type=` other than notify) every call
does nothing. The watchdog heartbeat is sent by the daemon's main loop, not by a thread, so a
stuck event loop stops it and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval_s(env)
        self._last_ping = 0.0
        self._socket: socket.socket | None = None  # opened at the first message

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for `seconds` more of start-up (or shutdown) time from now."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    def heartbeat(self) -> None:
        """Send WATCHDOG=1 if half the watchdog interval has passed since the last one."""
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_interval_s / 2:
            self._last_ping = now
            self._send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> None:
        if self._address is None:
            return
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as error:  # systemd gone or restarting: nothing to do but say so
            logger.warning("could not notify systemd (%s): %s", message.split("=")[0], error)


class StatusHandler(logging.Handler):
    """Forwards log records as STATUS= lines: the fetch and build progress (`edgeagent.progress`)
    shows in `systemctl status edgeagent` while the daemon prepares its model."""

    def __init__(self, notifier: Notifier) -> None:
        super().__init__(logging.INFO)
        self._notifier = notifier

    def emit(self, record: logging.LogRecord) -> None:
        self._notifier.status(record.getMessage())


# While the model is prepared and the engine starts, systemd's start timeout is pushed out by
# EXTEND_BY_S every EXTEND_EVERY_S from the event loop (a stuck loop stops it), for at most
# STARTUP_LIMIT_S: fetches and builds report progress, and an engine that takes longer is hung.
EXTEND_EVERY_S, EXTEND_BY_S, STARTUP_LIMIT_S = 10.0, 30.0, 4 * 3600.0


async def keep_alive_while_starting(notifier: Notifier, started_at: float, tick_s: float) -> None:
    """Heartbeats, and start timeout extensions, from the event loop until cancelled."""
    next_extend = 0.0
    while True:
        notifier.heartbeat()
        now = time.monotonic()
        if now >= next_extend and now - started_at < STARTUP_LIMIT_S:
            next_extend = now + EXTEND_EVERY_S
            notifier.extend_timeout(EXTEND_BY_S)
        await asyncio.sleep(tick_s)


@contextlib.contextmanager
def progress_as_status(notifier: Notifier) -> Iterator[None]:
    """Fetch and build progress lines (`edgeagent.progress`), forwarded as STATUS= lines."""
    progress, forward = logging.getLogger("edgeagent.progress"), StatusHandler(notifier)
    progress.addHandler(forward)
    try:
        yield
    finally:
        progress.removeHandler(forward)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    logger.warning("ignoring NOTIFY_SOCKET=%r: neither a path nor an abstract socket", value)
    return None


def _watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """WatchdogSec= as systemd passes it; None when unset or meant for another process."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000
