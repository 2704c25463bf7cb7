"""Fixtures of the fast tier: a box (a state directory) with version A serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from fast.fakes import Behaviour
from fast.runner import Box


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No host configuration, systemd socket or failpoint reaches a test's daemon."""
    monkeypatch.setenv("EDGEAGENT_CONFIG", str(tmp_path / "absent.toml"))
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "CREDENTIALS_DIRECTORY", "EDGEAGENT_FAILPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    """A box whose store has version A (current) and B (same layout, other words)."""
    box = Box(tmp_path)
    box.add("a", Behaviour(seed=1), current=True)
    box.add("b", Behaviour(seed=2))
    return box
