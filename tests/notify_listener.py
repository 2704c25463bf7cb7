"""A stand-in for systemd's end of the notify protocol: a datagram socket where NOTIFY_SOCKET
points, read on a thread, for tests of the daemon's READY/STATUS/WATCHDOG messages."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from waits import HANG_S


@dataclass
class Listener:
    """What systemd would see: every datagram, with when it arrived."""

    address: str
    messages: list[tuple[float, str]] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def wait_for(self, text: str, within_s: float = HANG_S) -> None:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if any(text in message for message in self.texts()):
                return
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never arrived; got {self.texts()}")


@contextlib.contextmanager
def listening(address: str) -> Iterator[Listener]:
    """A datagram socket bound where NOTIFY_SOCKET says, read on a thread until closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
    sock.settimeout(0.05)
    listener, stop = Listener(address), threading.Event()

    def read() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = sock.recv(4096)
                listener.messages.append((time.monotonic(), data.decode()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield listener
    finally:
        stop.set()
        reader.join()
        sock.close()
