"""Kill anywhere: a store operation killed at any file-system step leaves old or new, never a mix.

A real child process imports a version, switches `current` to it and runs gc, and SIGKILLs
itself at its 1st, 2nd, ... Nth file-system change (see crash_child.py). After each death the
store must show the old current or the new one, every version it lists must verify, and a
restart (gc, then the same operation again) must finish cleanly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from waits import HANG_S

from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore

CHILD = REPO / "tests" / "crash_child.py"


def _run_child(root: Path, model: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHILD), str(root), str(model), str(kill_at)],
        capture_output=True, text=True, timeout=HANG_S, check=False,
    )  # fmt: skip


@pytest.fixture
def seeded_store(tmp_path: Path, tiny_fp16: Path, tiny_fp16_b: Path) -> tuple[Path, str, str]:
    """A store whose current is the old version, plus an older one that gc will remove."""
    store = ModelStore(tmp_path / "seed")
    stale = tmp_path / "stale"
    shutil.copytree(tiny_fp16_b, stale)
    (stale / "notes.json").write_text('{"stale": true}')
    old_stale = store.import_directory(stale, ImportSource(origin="stale")).version
    current = store.import_directory(tiny_fp16_b, ImportSource(origin="old")).version
    store.activate(current)
    return store.root, current, old_stale


def test_killed_at_every_step_leaves_old_or_new(
    seeded_store: tuple[Path, str, str], tiny_fp16: Path, tmp_path: Path
) -> None:
    seed, old, _ = seeded_store
    dry = tmp_path / "dry"
    shutil.copytree(seed, dry, symlinks=True)
    completed = _run_child(dry, tiny_fp16, kill_at=0)
    assert completed.returncode == 0, completed.stderr
    steps = int(completed.stdout)
    new = ModelStore(dry).refs().current
    assert new not in (None, old)
    assert steps > 20

    outcomes = set()
    for kill_at in range(1, steps + 1):
        root = tmp_path / f"kill-{kill_at}"
        shutil.copytree(seed, root, symlinks=True)
        died = _run_child(root, tiny_fp16, kill_at)
        assert died.returncode == -9, f"step {kill_at}: {died.stderr}"
        outcomes.add(_check_consistent(root, old, new, kill_at))
        _check_restart_finishes(root, tiny_fp16, new)
        shutil.rmtree(root)
    assert outcomes == {"old", "new"}  # the kill points straddle the switch


def _check_consistent(root: Path, old: str, new: str | None, kill_at: int) -> str:
    store = ModelStore(root)
    refs = store.refs()
    assert refs.current in (old, new), f"step {kill_at}: current is {refs.current}"
    if refs.current == new:
        assert refs.previous == old, f"step {kill_at}: previous is {refs.previous}"
    for manifest in store.manifests():
        store.verify(manifest.version)  # raises on a partial or corrupt version
    store.verify("current")
    return "old" if refs.current == old else "new"


def _check_restart_finishes(root: Path, model: Path, new: str | None) -> None:
    store = ModelStore(root)
    store.gc(keep=0)
    version = store.import_directory(model, ImportSource(origin="retry")).version
    store.activate(version)
    assert version == new
    store.verify("current")
    leftovers = [p.name for p in store.staging_root.iterdir()]
    assert leftovers == [], leftovers
