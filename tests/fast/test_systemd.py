"""The notify protocol against real listening datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
from notify_listener import listening

from edgeagent.systemd import Notifier


@pytest.fixture(params=["path", "abstract"])
def notify_address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "path":
        return str(tmp_path / "notify.sock")
    return f"@edgeagent-test-{uuid.uuid4().hex}"


def test_messages_reach_the_socket_as_systemd_reads_them(notify_address: str) -> None:
    with listening(notify_address) as listener:
        notifier = Notifier({"NOTIFY_SOCKET": notify_address})
        notifier.status("fetching")
        notifier.extend_timeout(30)
        notifier.ready("serving tiny v1")
        notifier.stopping("draining 2 request(s)")
        notifier.close()
        listener.wait_for("STOPPING=1")
    assert listener.texts() == [
        "STATUS=fetching",
        "EXTEND_TIMEOUT_USEC=30000000",
        "READY=1\nSTATUS=serving tiny v1",
        "STOPPING=1\nSTATUS=draining 2 request(s)",
    ]


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier({})
    notifier.ready("serving")
    notifier.heartbeat()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None


def test_a_watchdog_meant_for_another_process_is_ignored(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "1000000"}
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 1.0


async def test_the_heartbeat_stops_while_the_event_loop_is_stuck(tmp_path: Path) -> None:
    """WATCHDOG=1 comes from the loop (as the daemon's main loop sends it, every tick): while a
    coroutine blocks the loop for 1.5 s, no heartbeat goes out; it resumes afterwards."""
    address = str(tmp_path / "watchdog.sock")
    with listening(address) as listener:
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})

        async def main_loop() -> None:
            while True:
                notifier.heartbeat()
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(main_loop())
        await asyncio.sleep(1.0)
        stalled_at = time.monotonic()
        time.sleep(1.5)  # noqa: ASYNC251  # the point: the loop is stuck, nothing else runs
        resumed_at = time.monotonic()
        await asyncio.sleep(1.0)
        ticking.cancel()
        notifier.close()
    pings = [at for at, text in listener.messages if text == "WATCHDOG=1"]
    before = [at for at in pings if at < stalled_at]
    during = [at for at in pings if stalled_at + 0.05 < at < resumed_at]
    after = [at for at in pings if at > resumed_at]
    assert len(before) >= 8  # every 0.1 s: half the 0.2 s interval
    assert during == []
    assert len(after) >= 8
