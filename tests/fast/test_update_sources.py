"""Where updates come from, inside a running daemon: the drop directory (watchdog) and hub
polling (against the loopback hub server), and the supervision that keeps both alive."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import shutil
import socket
from pathlib import Path

import pytest
from hub_server import HubServer
from waits import HANG_S, until

from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.sources.hub_download import RetryPolicy
from edgeagent.tasks import Supervisor
from edgeagent.updates.drop_dir import DropDirectory
from edgeagent.updates.hub_poll import HubPoller
from fast.runner import Box, in_process, slot_and_updater


async def _until(condition_path: Path, within_s: float = HANG_S) -> None:
    for _ in range(int(within_s / 0.05)):
        if await asyncio.to_thread(condition_path.exists):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{condition_path} did not appear within {within_s} s")


async def test_a_drop_is_taken_only_once_it_is_ready(box: Box) -> None:
    """1. Files of version B are copied into the drop directory one by one: nothing happens.
    2. READY appears: B is imported, updated to, and the drop filed under done/."""
    source, b = box.root / "sources" / "b", box.versions["b"].version
    async with in_process(box) as daemon:
        incoming = box.drop / "release-b"
        incoming.mkdir(parents=True)
        for path in sorted(source.iterdir()):
            shutil.copyfile(path, incoming / path.name)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert (await daemon.status()).version == box.versions["a"].version
        (incoming / "READY").touch()
        await _until(box.drop / "done" / "release-b")
        status = await daemon.status()
    assert (status.version, status.history[0].result) == (b, 1)
    assert not (box.drop / "done" / "release-b" / "READY").exists()
    assert list((box.drop / "failed").iterdir()) == []
    assert list((box.drop / "taken").iterdir()) == []


async def test_a_drop_left_while_the_daemon_was_down_is_taken_at_start(box: Box) -> None:
    shutil.copytree(box.root / "sources" / "b", box.drop / "while-down")
    (box.drop / "while-down" / "READY").touch()
    async with in_process(box) as daemon:
        await _until(box.drop / "done" / "while-down")
        assert (await daemon.status()).version == box.versions["b"].version


async def test_a_drop_that_is_not_a_model_is_filed_as_failed_and_the_next_is_taken(
    box: Box,
) -> None:
    async with in_process(box) as daemon:
        junk = box.drop / "junk"
        junk.mkdir(parents=True)
        (junk / "notes.txt").write_text("not a model")
        (junk / "READY").touch()
        await _until(box.drop / "failed" / "junk")
        shutil.copytree(box.root / "sources" / "b", box.drop / "good")
        (box.drop / "good" / "READY").touch()
        await _until(box.drop / "done" / "good")
        assert (await daemon.status()).version == box.versions["b"].version
    assert "no config.json" in (box.drop / "failed" / "junk" / "REASON").read_text()


async def test_a_failing_watcher_is_logged_and_restarted(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    """The drop handler raises on the first drop (a bug, an unreadable disk): the supervisor
    logs it with its traceback and starts the watcher again; the next drop is handled."""
    handled: list[str] = []

    async def handle(claimed: Path) -> None:
        if not handled:
            handled.append("crashed")
            raise RuntimeError("handler bug on the first drop")
        handled.append(claimed.name)

    supervisor = Supervisor(first_backoff_s=0.1)
    supervisor.start("drop-directory", DropDirectory(box.drop, handle).run)
    try:
        for name in ("first", "second"):
            await asyncio.sleep(0.3)
            (box.drop / name).mkdir(parents=True)
            (box.drop / name / "READY").touch()
        for _ in range(100):
            if "second" in handled:
                break
            await asyncio.sleep(0.05)
    finally:
        await supervisor.stop()
    assert handled[0] == "crashed"
    assert "second" in handled
    assert supervisor.failures["drop-directory"] == 1
    failure = next(
        r for r in caplog.records if "background task drop-directory failed" in r.message
    )
    assert failure.levelno == logging.ERROR
    assert failure.exc_info is not None
    assert "handler bug" in str(failure.exc_info[1])


async def test_supervisor_backs_off_and_stop_awaits_every_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The backoff doubles up to its cap, as the supervisor logs it, and no restart comes
    sooner than its backoff (a busy machine makes the gaps longer, never shorter)."""
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def always_fails() -> None:
        starts.append(loop.time())
        raise ValueError("broken")

    cancelled = asyncio.Event()

    async def runs_until_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    supervisor = Supervisor(first_backoff_s=0.05, max_backoff_s=0.2)
    caplog.set_level(logging.ERROR, logger="edgeagent.tasks")
    supervisor.start("fails", always_fails)
    supervisor.start("runs", runs_until_cancelled)
    await until("five failures", lambda: len(starts) >= 5)
    await supervisor.stop()
    backoffs = [float(r.args[2]) for r in caplog.records if r.name == "edgeagent.tasks"]  # type: ignore[index]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert cancelled.is_set()
    assert backoffs[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert all(gap >= backoff - 1e-3 for gap, backoff in zip(gaps, backoffs, strict=False))


async def test_a_new_hub_commit_is_fetched_and_updated_to(box: Box) -> None:
    """The loopback hub's main moves from A's files to B's: the next poll fetches B and
    promotes it; polls before and after change nothing."""
    _, updater = await slot_and_updater(box)
    with HubServer() as hub:
        repo = hub.add_repo("edge/tiny")
        repo.commit(box.root / "sources" / "a")
        fetcher = HubFetcher(box.store, endpoint=hub.endpoint)
        poller = HubPoller(fetcher, HubTarget("edge/tiny"), updater, interval_s=60)
        unchanged = await poller.poll_once()
        repo.commit(box.root / "sources" / "b")
        moved = await poller.poll_once()
        again = await poller.poll_once()
        asked = [path for method, path, _ in hub.requests if path.startswith("/api/models/")]
    assert unchanged is None
    assert moved is not None
    assert (moved.result, moved.version) == ("promoted", box.versions["b"].version)
    assert again is None
    assert updater.serving_version == box.versions["b"].version
    assert poller.failures == 0
    assert len([path for path in asked if path.endswith("/revision/main")]) == 3  # one a poll


async def test_hub_poll_failures_back_off_with_jitter(box: Box) -> None:
    _, updater = await slot_and_updater(box)
    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    fetcher = HubFetcher(box.store, endpoint=endpoint, policy=RetryPolicy(attempts=1))
    poller = HubPoller(fetcher, HubTarget("edge/tiny"), updater, interval_s=10, jitter=0,
                       max_backoff_s=35)  # fmt: skip
    delays = [poller.next_delay_s()]
    for _ in range(3):
        assert await poller.poll_once() is None
        delays.append(poller.next_delay_s())
    jittered = HubPoller(fetcher, HubTarget("edge/tiny"), updater, interval_s=10, jitter=0.1,
                         rng=random.Random(7))  # fmt: skip
    spread = [jittered.next_delay_s() for _ in range(50)]
    assert delays == [10, 20, 35, 35]
    assert poller.failures == 3
    assert all(9 <= d <= 11 for d in spread)
    assert len(set(spread)) == 50
