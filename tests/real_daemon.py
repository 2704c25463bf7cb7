"""The real daemon as a process (`edgeagent serve`) on the real CPU engine, for the tests that
need its signals, its processes or its exit code: the shared launcher (`launcher.py`) with the
real tier's settings, waited for until it serves."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO
from launcher import Launched, launch
from waits import HANG_S

from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore


def start_daemon(
    tmp_path: Path, grace_s: float, served: Path | None = None, **extra_env: str
) -> Launched:
    """A daemon whose store holds `served` as current; with None, an empty store."""
    if served is not None:
        store = ModelStore(tmp_path / "state" / "models")
        store.activate(store.import_directory(served, ImportSource(origin=str(served))).version)
    settings = {
        "EDGEAGENT_MODEL__KV_CACHE_GIB": "0.25",
        # These daemons update between random-weight models, which the quality gate refuses (it
        # has its own tests: tests/test_updates.py and the fast tier).
        "EDGEAGENT_UPDATES__QUALITY_GATE": "false",
        "EDGEAGENT_SERVER__DRAIN_GRACE_S": str(grace_s),
        **extra_env,
    }
    # The cache is the tests' own: the compile cache and the trained model are shared.
    daemon = launch(tmp_path, tmp_path / "state", REPO / ".cache", settings)
    daemon.wait_until_serving(HANG_S)
    return daemon
