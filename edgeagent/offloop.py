"""Blocking work (a fetch, a build, a verification) on a thread while the event loop goes on
noticing signals and telling systemd it is alive; and killing what a forced exit leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from edgeagent.errors import StoppedError

T = TypeVar("T")


async def run_off_loop(
    work: Callable[[], T],
    *,
    stop_requested: Callable[[], bool],
    cancel: threading.Event,
    cancel_wait_s: float | None,
    tick_s: float,
) -> T:
    """`work()` on a thread; every `tick_s` the loop checks `stop_requested`.

    On a stop, `cancel` is set (a download stops within a chunk, a build's AutoRound process is
    stopped), the thread gets `cancel_wait_s` to end (None: as long as it takes, for work that
    cannot be cancelled, like an engine start), and StoppedError is raised.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # handed to the event loop, raised there
            loop.call_soon_threadsafe(_settle, done, None, error)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    worker = threading.Thread(target=run, name="off-loop", daemon=True)
    worker.start()
    while not done.done():
        if stop_requested():
            cancel.set()
            await asyncio.to_thread(worker.join, cancel_wait_s)
            done.add_done_callback(_consume)  # the work's own StoppedError is expected
            raise StoppedError("stopped while preparing the model")
        await asyncio.wait({done}, timeout=tick_s)
    return done.result()


def _consume(future: asyncio.Future[T]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def kill_descendants() -> None:
    """SIGKILL every process below this one (Linux /proc), deepest first."""
    pending, found = [os.getpid()], []
    while pending:
        pid = pending.pop()
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(child) for child in children.read_text().split()]
                found += kids
                pending += kids
    for pid in reversed(found):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
