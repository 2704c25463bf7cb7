"""Mender's update module (`edgeagent mender-module`), driven as the Mender client drives it
through update-module protocol v3's file tree (streams, `stream-next`, `tmp/`), against the
fake-engine daemon: Download stores only what the trust settings admit; Install, Commit and
Rollback move the daemon. The real client in a booted systemd is tests/system's.

The module runs in this process (`main`, as `edgeagent mender-module` calls it); its import
step is the `edgeagent models import` child it starts."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgeagent.cli import main
from fast.fakes import Behaviour
from fast.runner import Box, child_process
from fast.signed import KeyPair, signed_model, trust_settings


class MenderTree:
    """The payload's file tree as Mender makes it, and Mender's side of the Download state:
    each file offered on `stream-next`, then written into its own pipe."""

    def __init__(self, root: Path, artifact_name: str) -> None:
        self.root = root
        self.done = threading.Event()  # the module's state returned
        for folder in ("header", "tmp", "streams"):
            (root / folder).mkdir(parents=True)
        (root / "header" / "artifact_name").write_text(artifact_name)
        os.mkfifo(root / "stream-next")

    @contextmanager
    def streaming(self, model_dir: Path) -> Iterator[None]:
        files = sorted(p for p in model_dir.iterdir() if p.is_file())
        for path in files:
            os.mkfifo(self.root / "streams" / path.name)
        errors: list[BaseException] = []
        mender = threading.Thread(target=self._offer, args=(files, errors), daemon=True)
        mender.start()
        yield
        self.done.set()
        mender.join(timeout=30)
        assert not mender.is_alive(), "the module stopped reading the streams"
        assert errors == []

    def _offer(self, files: list[Path], errors: list[BaseException]) -> None:
        try:
            for path in files:
                self._write(self.root / "stream-next", f"streams/{path.name}\n".encode())
                self._write(self.root / "streams" / path.name, path.read_bytes())
            self._write(self.root / "stream-next", b"")  # the end: a read of zero bytes
        except (BrokenPipeError, TimeoutError):  # the module stopped reading: its exit says why
            pass
        except BaseException as error:
            errors.append(error)

    def _write(self, pipe: Path, data: bytes) -> None:
        """Into `pipe` once the module opens it; TimeoutError if it never does (it failed)."""
        for _ in range(1000):
            try:
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as error:
                if error.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                if self.done.wait(0.01):
                    raise TimeoutError(pipe) from error
        else:
            raise TimeoutError(pipe)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as sink:
            sink.write(data)

    def learned(self, name: str) -> str:
        path = self.root / "tmp" / name
        return path.read_text() if path.exists() else ""


@pytest.fixture
def publisher(tmp_path: Path) -> KeyPair:
    return KeyPair.make(tmp_path / "keys", "publisher")


def _module(
    monkeypatch: pytest.MonkeyPatch, state: str, tree: MenderTree, env: dict[str, str]
) -> int:
    with monkeypatch.context() as environment:
        for name, value in env.items():
            environment.setenv(name, value)
        return main(["mender-module", state, str(tree.root)])


def test_download_stores_a_signed_artifact_and_refuses_an_unsigned_one(
    tmp_path: Path, publisher: KeyPair, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Where the publisher's key is required: 1. a signed model's files, streamed, become a
    stored version carrying the signature, remembered for ArtifactInstall; the staging
    directory is gone. 2. The same files unsigned: the state fails naming why, and the store
    holds nothing new."""
    box = Box(tmp_path / "box")
    env = {**box.environment(), **trust_settings(publisher)}
    signed = signed_model(tmp_path / "signed", publisher, Behaviour(seed=3))
    tree = MenderTree(tmp_path / "signed-tree", "model-3")
    with tree.streaming(signed):
        assert _module(monkeypatch, "Download", tree, env) == 0, capsys.readouterr().err
    version = tree.learned("version")
    manifest = box.store.manifest(version)
    assert manifest.signature is not None
    assert manifest.signature.checked == f"verified with {publisher.public}"
    assert not list((box.root / "cache" / "mender").iterdir())

    unsigned = signed_model(tmp_path / "unsigned", None, Behaviour(seed=4))
    tree = MenderTree(tmp_path / "unsigned-tree", "model-4")
    with tree.streaming(unsigned):
        assert _module(monkeypatch, "Download", tree, env) == 1
    refused = capsys.readouterr().err
    assert "the artifact was not stored" in refused
    assert "is not signed" in refused
    assert tree.learned("version") == ""
    assert [m.version for m in box.store.manifests()] == [version]


@pytest.mark.skipif(shutil.which("mender-artifact") is None, reason="Debian's mender-artifact")
def test_an_artifact_of_a_stored_version_carries_its_files_and_signature(
    tmp_path: Path, publisher: KeyPair, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    box = Box(tmp_path / "box")
    env = {**box.environment(), **trust_settings(publisher)}
    signed = signed_model(tmp_path / "signed", publisher, Behaviour(seed=5))
    with monkeypatch.context() as environment:
        for name, value in env.items():
            environment.setenv(name, value)
        assert main(["models", "import", str(signed)]) == 0
        version = capsys.readouterr().out.strip()
        output = tmp_path / "v.mender"
        assert main(["mender-artifact", version, "-o", str(output), "-t", "box"]) == 0
    listed = subprocess.run(["mender-artifact", "read", str(output)], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert f"Name: edgeagent-model-{version}" in listed
    assert re.search(r"Type:\s+edgeagent-model\n", listed), listed
    carried = re.findall(r"name:\s+(\S+)", listed)
    assert carried == sorted(p.name for p in signed.iterdir()), listed  # model.sig among them


async def test_install_commit_and_rollback_move_the_daemon_and_outlast_its_death(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """1. The daemon SIGKILLs itself loading B (`update.loading`): ArtifactInstall fails;
    ArtifactRollback waits while nothing answers, then finds A served by the daemon started
    again (systemd's part here); ArtifactFailure leaves it so. 2. On that daemon (a 0.5 s
    probation) the protocol's questions are answered; ArtifactInstall swaps to C;
    ArtifactCommit returns once C is out of probation; ArtifactRollback serves A again."""
    box = Box(tmp_path / "box")
    a = box.add("a", Behaviour(seed=1), current=True).version
    b = box.add("b", Behaviour(seed=2)).version
    c = box.add("c", Behaviour(seed=3)).version
    env = box.environment(EDGEAGENT_UPDATES__PROBATION_S="0.5")
    tree = MenderTree(tmp_path / "tree", "model-b")

    async def state(name: str) -> int:  # the module blocks on gRPC: off the daemon's loop
        return await asyncio.to_thread(_module, monkeypatch, name, tree, env)

    (tree.root / "tmp" / "version").write_text(b)
    with child_process(box, EDGEAGENT_FAILPOINT="update.loading") as killed:
        await killed.until_serving()
        assert await state("ArtifactInstall") != 0
        assert await asyncio.to_thread(killed.wait) == -signal.SIGKILL
    rollback = asyncio.create_task(state("ArtifactRollback"))
    await asyncio.sleep(0.3)
    assert not rollback.done()  # waiting for a daemon to answer
    with child_process(box, "restarted.log", EDGEAGENT_UPDATES__PROBATION_S="0.5") as daemon:
        assert await rollback == 0, capsys.readouterr().err
        assert await state("ArtifactFailure") == 0, capsys.readouterr().err
        assert f"serving {a}" in capsys.readouterr().err
        assert box.store.refs().current == a

        (tree.root / "tmp" / "version").write_text(c)
        assert await state("SupportsRollback") == 0
        assert await state("NeedsArtifactReboot") == 0
        assert capsys.readouterr().out.split() == ["Yes", "No"]
        assert await state("ArtifactInstall") == 0, capsys.readouterr().err
        assert tree.learned("before") == a
        assert (await daemon.status()).version == c
        assert await state("ArtifactCommit") == 0
        assert f"{c} serves, its probation over" in capsys.readouterr().err
        assert await state("ArtifactRollback") == 0
        assert f"serving {a} again" in capsys.readouterr().err
        assert (await daemon.status()).version == a
    assert box.store.refs().current == a
