"""The Unix sockets both listeners serve on (gRPC's app and admin sockets, the OpenAI API's),
and the checks preflight runs on their paths: never take over a live server's socket or a file
that is not a socket; the socket file never wider than its mode, then given its group."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeagent.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnixListener:
    path: Path
    mode: int
    group: str | None = None

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Around the call that creates the socket file: its path claimed, and the umask set
        so the file is never created wider than `mode`."""
        claim_socket_path(self.path)
        old_umask = os.umask(0o777 & ~self.mode)
        try:
            yield
        finally:
            os.umask(old_umask)

    def restrict(self, what: str) -> None:
        """Give the created socket file its group and mode; log what listens there."""
        if self.group is not None:
            os.chown(self.path, -1, group_id(self.group))
        os.chmod(self.path, self.mode)
        logger.info("%s on unix socket %s (mode %o%s)", what, self.path, self.mode,
                    f", group {self.group}" if self.group else "")  # fmt: skip


# sun_path holds 108 bytes with its terminating NUL (unix(7)); a longer path fails only at bind.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(path: Path) -> None:
    """Refuse a path too long for a Unix socket, one that another live server listens on, or one
    that is not a socket."""
    if (length := len(os.fsencode(path))) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"{path} is {length} bytes; a Unix socket's path may have at most "
            f"{MAX_SOCKET_PATH_BYTES}: choose a shorter runtime_dir or socket path"
        )
    if path.is_socket() and _socket_accepts(path):
        raise ConfigError(f"another server is listening on {path}; is edgeagent already running?")
    if path.exists() and not path.is_socket():
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")


def claim_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    check_socket_path(path)
    path.unlink(missing_ok=True)  # a socket left behind by a process that died


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"server.socket_group: no group named {name!r}") from None


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
