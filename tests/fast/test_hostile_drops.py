"""A drop directory written by something that cannot be trusted (an OTA agent, a USB stick).

Each hostile drop is refused: filed under failed/ with its reason, a warning in the log, and a
"drop" entry in `edgeagent status`; the serving version is untouched and the next valid drop
is taken as usual. None of them can make the daemon read outside the drop or block.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from fast.fakes import Behaviour, make_fake_model
from fast.runner import Box, InProcess, child_process, in_process

SECRET = "/etc/shadow-like secret: must never reach the store"


def _drop(box: Box, name: str, source: Path | None = None) -> Path:
    """A copy of version B's files (or `source`) in the drop directory, not yet READY."""
    target = box.drop / name
    shutil.copytree(source or box.root / "sources" / "b", target)
    return target


def _outside_symlink(box: Box) -> Path:
    secret = box.root / "secret.txt"
    secret.write_text(SECRET)
    drop = _drop(box, "outside-link")
    (drop / "notes.txt").symlink_to(secret)
    return drop


def _inside_symlink(box: Box) -> Path:
    drop = _drop(box, "inside-link")
    (drop / "model.safetensors").rename(drop / "weights.bin")
    (drop / "model.safetensors").symlink_to("weights.bin")
    return drop


def _drop_is_a_symlink(box: Box) -> Path:
    elsewhere = box.root / "elsewhere"
    shutil.copytree(box.root / "sources" / "b", elsewhere)
    (box.drop / "linked").symlink_to(elsewhere, target_is_directory=True)
    return box.drop / "linked"


def _fifo(box: Box) -> Path:
    drop = _drop(box, "fifo")
    os.mkfifo(drop / "tokenizer.json")
    return drop


def _device(box: Box) -> Path:
    drop = _drop(box, "device")
    os.mknod(drop / "vocab.txt", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    return drop


def _store_name(box: Box) -> Path:
    """A drop carrying a manifest that claims to be version A, with other content."""
    drop = _drop(box, box.versions["a"].version, make_fake_model(box.root / "x", Behaviour(9)))
    (drop / "manifest.json").write_text(box.store.manifest("current").model_dump_json())
    return drop


HOSTILE: list[tuple[Callable[[Box], Path], str]] = [
    (_outside_symlink, "symbolic link"),
    (_inside_symlink, "symbolic link"),
    (_drop_is_a_symlink, "symbolic link"),
    (_fifo, "is a FIFO"),
    (_device, "is a device file"),
    (_store_name, "named like the store's own files"),
]


async def _then_a_valid_drop_is_taken(box: Box, daemon: InProcess) -> None:
    valid = _drop(box, "valid-b")
    (valid / "READY").touch()
    assert (await box.until_filed("valid-b")).parent.name == "done"
    assert (await daemon.status()).version == box.versions["b"].version


@pytest.mark.skipif(os.geteuid() != 0, reason="device files need root")
@pytest.mark.parametrize(("make", "says"), HOSTILE, ids=[m.__name__.strip("_") for m, _ in HOSTILE])
async def test_a_hostile_drop_is_refused_and_the_next_is_taken(
    box: Box, make: Callable[[Box], Path], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with in_process(box) as daemon:
        drop = make(box)
        (drop / "READY").touch()
        filed = await box.until_filed(drop.name)
        status = await daemon.status()
        assert status.version == box.versions["a"].version
        await _then_a_valid_drop_is_taken(box, daemon)
    assert filed.parent.name == "failed"
    assert says in (filed / "REASON").read_text()
    refused = next(o for o in status.history if o.kind == "drop")
    assert (refused.version, refused.result) == (drop.name, 2)
    assert says in refused.reason
    assert any(says in r.message and r.levelname == "WARNING" for r in caplog.records)
    assert not any(
        SECRET in p.read_text(errors="replace") for p in box.store.blobs.iterdir() if p.is_file()
    )


async def test_a_file_that_keeps_growing_is_refused_without_blocking(box: Box) -> None:
    """A writer appends to a weights file all the time: the import copies it as listed, sees
    it changed, refuses the drop; the valid drop after it is taken."""
    drop = _drop(box, "growing")
    growing = drop / "extra.safetensors"
    growing.write_bytes(b"\0" * (16 << 20))
    stop = threading.Event()

    def append() -> None:
        with growing.open("ab") as out:
            while not stop.wait(0.001):
                out.write(b"\0" * 4096)
                out.flush()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        async with in_process(box) as daemon:
            (drop / "READY").touch()
            filed = await box.until_filed("growing")
            stop.set()
            await _then_a_valid_drop_is_taken(box, daemon)
    finally:
        stop.set()
        writer.join()
    assert filed.parent.name == "failed"
    assert "changed while it was imported" in (filed / "REASON").read_text()


async def test_the_same_name_renamed_in_again_and_again_is_kept_apart(box: Box) -> None:
    """A finished directory named "twice" is renamed in three times: the first is promoted,
    the others are refused (already serving); all three are kept, none overwritten."""
    box.drop.mkdir(parents=True, exist_ok=True)
    async with in_process(box) as daemon:
        for round_ in range(3):
            prepared = box.root / f"prepared-{round_}"
            shutil.copytree(box.root / "sources" / "b", prepared)
            (prepared / "READY").touch()
            prepared.rename(box.drop / "twice")
            for _ in range(200):
                if not (box.drop / "twice").exists() and not any((box.drop / "taken").iterdir()):
                    break
                await asyncio.sleep(0.02)
        status = await daemon.status()
    filed = sorted(str(p.relative_to(box.drop)) for p in box.drop.glob("*/twice*"))
    assert filed == ["done/twice", "failed/twice", "failed/twice.2"]
    assert "already serving" in (box.drop / "failed" / "twice.2" / "REASON").read_text()
    assert status.version == box.versions["b"].version


async def test_a_drop_named_like_an_existing_version_gets_its_own(box: Box) -> None:
    a = box.versions["a"].version
    drop = _drop(box, a, make_fake_model(box.root / "x", Behaviour(9)))
    async with in_process(box) as daemon:
        (drop / "READY").touch()
        await box.until_filed(a)
        status = await daemon.status()
    assert status.version not in (a, box.versions["b"].version)
    box.store.verify(a)  # the version whose name it took is untouched


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="dropping the file-permission override of a root process needs root and setpriv",
)
async def test_a_drop_the_daemon_cannot_read_is_refused(box: Box) -> None:
    """The daemon runs without root's power to read any file (as the systemd unit's user
    would); a drop holds a file only its owner may read."""
    drop = _drop(box, "unreadable")
    (drop / "secret.json").write_text("{}")
    (drop / "secret.json").chmod(0o600)
    os.chown(drop / "secret.json", 65534, 65534)
    with child_process(box, without_file_override=True) as daemon:
        await daemon.until_serving()
        (drop / "READY").touch()
        filed = await box.until_filed("unreadable")
        valid = _drop(box, "valid-b")
        (valid / "READY").touch()
        assert (await box.until_filed("valid-b")).parent.name == "done", daemon.tail()
        status = await daemon.status()
    assert filed.parent.name == "failed"
    assert "Permission denied" in (filed / "REASON").read_text()
    assert status.version == box.versions["b"].version
