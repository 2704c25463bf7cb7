"""Talking to a hub that may be slow, overloaded or hostile: bounded retries and one file's
download, verified as its bytes arrive.

A file is appended to its `.part` from where the last attempt (or the last process) stopped,
with `Range`; its sha256 (and, for a file outside LFS, its git blob id) is computed as the bytes
arrive, on a thread of its own so that hashing overlaps the network (a part already on disk is
read once, to seed it), and the store takes that digest rather than reading the file again.
Nothing past the listed size is ever written, so an endless body costs at most the listed
bytes; a server that stalls is retried a few times, then given up on. 429 and 503 are retried
after `Retry-After` (capped) or an exponential backoff; other errors are not. The finished file
must have the listed size and digest, or it is deleted and refused. The HTTP client is
huggingface_hub's (its proxies, headers and redirect limit).
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import httpx2
from huggingface_hub import get_session
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils._http import hf_raise_for_status

from edgeagent.errors import CorruptArtifactError, HubUnreachableError, StoppedError
from edgeagent.store.store import Expected

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRIED_STATUSES = (429, 503)
CHUNK = 4 << 20
SYNC_EVERY = 64 << 20  # bytes written between two fdatasync calls made behind the download
_STALLS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a hub that is busy (429, 503) or stalls."""

    attempts: int = 5
    first_wait_s: float = 1.0
    max_wait_s: float = 60.0  # a longer Retry-After is not waited for: the attempt fails
    timeout_s: float = 10.0  # connect, and between two chunks of a body

    def wait_s(self, attempt: int, retry_after_s: float | None) -> float:
        backoff = self.first_wait_s * 2.0 ** (attempt - 1)
        return min(self.max_wait_s, max(backoff, retry_after_s or 0.0))


@dataclass(frozen=True)
class Digests:
    sha256: str
    git_sha1: str


def call_with_retries(
    call: Callable[[], T], what: str, policy: RetryPolicy, cancel: threading.Event | None
) -> T:
    """`call()` (a metadata request), again after a 429 or 503 or a stall, up to the policy."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status not in RETRIED_STATUSES or attempt == policy.attempts:
                raise
            headers = error.response.headers if error.response is not None else {}
            _pause(policy, attempt, _retry_after_s(headers), f"{what}: the hub answered {status}",
                   cancel)  # fmt: skip
        except _STALLS as error:
            if attempt == policy.attempts:
                raise
            _pause(policy, attempt, None, f"{what}: {type(error).__name__}", cancel)
    raise AssertionError("unreachable")


def download(
    url: str, part: Path, expected: Expected, headers: dict[str, str], policy: RetryPolicy,
    cancel: threading.Event | None,
) -> Digests:  # fmt: skip
    """Complete `part` from the hub and check it against `expected`; its digests."""
    with part.open("ab+") as out:
        with _Hashers.running(expected.size, git=bool(expected.git_sha1), file=out) as hashers:
            hashers.seed(out)
            _fill(url, out, hashers, expected, headers, policy, cancel)
            out.flush()
            digests = hashers.digests()
        os.fsync(out.fileno())
    if problem := _mismatch(digests, expected):
        part.unlink()
        raise CorruptArtifactError(f"{url}: {problem}; refused and deleted")
    return digests


def _fill(
    url: str, out: BinaryIO, hashers: _Hashers, expected: Expected, headers: dict[str, str],
    policy: RetryPolicy, cancel: threading.Event | None,
) -> None:  # fmt: skip
    for attempt in range(1, policy.attempts + 1):
        try:
            status, retry_after = _one_request(url, out, hashers, expected, headers, policy,
                                               cancel)  # fmt: skip
        except _STALLS as error:
            status, retry_after = type(error).__name__, None
        if out.tell() == expected.size:
            return
        if attempt == policy.attempts:
            raise HubUnreachableError(
                f"{url}: {out.tell()} of {expected.size} bytes after {attempt} attempts "
                f"(last: {status}); the next fetch resumes it"
            )
        _pause(policy, attempt, retry_after, f"{url}: {status}", cancel)


def _one_request(
    url: str, out: BinaryIO, hashers: _Hashers, expected: Expected, headers: dict[str, str],
    policy: RetryPolicy, cancel: threading.Event | None,
) -> tuple[str, float | None]:  # fmt: skip
    """One GET from where `out` ends; how it ended (a status to retry on, or "done")."""
    start = out.tell()
    request_headers = {**headers, **({"Range": f"bytes={start}-"} if start else {})}
    timeout = httpx2.Timeout(policy.timeout_s)
    with get_session().stream("GET", url, headers=request_headers, timeout=timeout) as response:
        if response.status_code in RETRIED_STATUSES:
            return str(response.status_code), _retry_after_s(response.headers)
        hf_raise_for_status(response)
        if start and response.status_code == 200:  # the server ignored Range: start over
            out.seek(0)
            out.truncate()
            hashers.reset()
        for chunk in response.iter_bytes(CHUNK):
            if cancel is not None and cancel.is_set():
                raise StoppedError("the fetch was cancelled; the next fetch resumes it")
            if out.tell() + len(chunk) > expected.size:
                raise CorruptArtifactError(
                    f"{url}: the body is longer than the {expected.size} bytes listed; refused"
                )
            out.write(chunk)
            hashers.update(chunk)
    return "ended early" if out.tell() < expected.size else "done", None


def _pause(
    policy: RetryPolicy, attempt: int, retry_after_s: float | None, why: str,
    cancel: threading.Event | None,
) -> None:  # fmt: skip
    if retry_after_s is not None and retry_after_s > policy.max_wait_s:
        raise HubUnreachableError(
            f"{why}, asking to retry after {retry_after_s:.0f} s (more than the "
            f"{policy.max_wait_s:.0f} s edgeagent waits); try again later"
        )
    wait_s = policy.wait_s(attempt, retry_after_s)
    logger.warning("%s; retrying in %.1f s (attempt %d of %d)", why, wait_s, attempt + 1,
                   policy.attempts)  # fmt: skip
    if cancel is not None and cancel.wait(wait_s):
        raise StoppedError("the fetch was cancelled; the next fetch resumes it")
    if cancel is None:
        time.sleep(wait_s)


def _retry_after_s(headers: object) -> float | None:
    """`Retry-After` as seconds (a number, or an HTTP date)."""
    value = getattr(headers, "get", lambda _: None)("Retry-After")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _mismatch(digests: Digests, expected: Expected) -> str | None:
    if expected.sha256 and digests.sha256 != expected.sha256:
        return f"sha256 {digests.sha256[:12]}…, the hub lists {expected.sha256[:12]}…"
    if expected.git_sha1 and digests.git_sha1 != expected.git_sha1:
        return f"git blob id {digests.git_sha1[:12]}…, the hub lists {expected.git_sha1[:12]}…"
    return None


class _Hashers:
    """sha256 (the store's id) and, for a file outside LFS, the git blob id (the hub's), fed
    through a short queue to a thread of their own: hashlib drops the GIL on large updates, so
    a file is hashed while the next chunk is on the wire (inline, sha256 alone cost a quarter of
    a loopback download's time here). The same thread flushes the file to disk every
    `SYNC_EVERY` bytes, so the final fsync has little left to write (1 GiB written, then
    fsynced at the end, waited 1.1 s for it here)."""

    _RESET = b""  # an empty chunk in the queue means "start over"; no real chunk is empty

    def __init__(self, size: int, git: bool, file: BinaryIO) -> None:
        self._size, self._git_wanted, self._file = size, git, file
        self._unsynced = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._new_hashes()
        self._thread = threading.Thread(target=self._hash_queued, name="fetch-hash", daemon=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls, size: int, git: bool, file: BinaryIO) -> Iterator[_Hashers]:
        hashers = cls(size, git, file)
        hashers._thread.start()
        try:
            yield hashers
        finally:
            hashers._stop()

    def reset(self) -> None:
        self._queue.put(self._RESET)

    def seed(self, file: BinaryIO) -> None:
        """Hash what an earlier attempt left in `file`, leaving it positioned at its end; a
        part longer than the file can be is started over."""
        file.seek(0)
        while chunk := file.read(CHUNK):
            self.update(chunk)
        if file.tell() > self._size:
            file.seek(0)
            file.truncate()
            self.reset()

    def update(self, chunk: bytes) -> None:
        if chunk:
            self._queue.put(chunk)

    def digests(self) -> Digests:
        self._stop()
        return Digests(self._sha256.hexdigest(), self._git.hexdigest() if self._git else "")

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _new_hashes(self) -> None:
        self._sha256 = hashlib.sha256()
        header = f"blob {self._size}\0".encode()
        self._git = hashlib.sha1(header, usedforsecurity=False) if self._git_wanted else None

    def _hash_queued(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if not chunk:
                self._new_hashes()
                continue
            self._sha256.update(chunk)
            if self._git is not None:
                self._git.update(chunk)
            self._unsynced += len(chunk)
            if self._unsynced >= SYNC_EVERY:  # every byte hashed has been written
                os.fdatasync(self._file.fileno())
                self._unsynced = 0
