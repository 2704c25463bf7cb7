"""Which version a starting daemon serves: `current` when it verifies, fits and passes its smoke
test, else `previous` (never one marked bad), else exit 10 naming every reason. The start rows
S1-S6 of docs/update-failures.md, each by its test of the same name."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.daemon import Daemon
from edgeagent.errors import NoServableVersionError
from fast.fakes import Behaviour, FakeEngines, FakeProbe
from fast.runner import Box, in_process


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.fixture
def box_b_current(box: Box) -> Box:
    """A then B activated: B is current, A previous."""
    box.store.activate(box.versions["b"].version)
    return box


async def _serves(box: Box) -> str:
    async with in_process(box) as daemon:
        return (await daemon.generate()).model_version


async def test_current_serves_when_it_is_sound(box_b_current: Box) -> None:
    assert await _serves(box_b_current) == box_b_current.versions["b"].version


async def test_the_start_timeline_accounts_for_the_start_phase_by_phase(box: Box) -> None:
    """`edgeagent status` shows where a start's seconds went, from the process's start."""
    async with in_process(box) as daemon:
        phases = [(p.name, p.seconds) for p in (await daemon.status()).start_timeline]
        since_start = daemon.daemon.timeline.total_s
    names = [name for name, _ in phases]
    assert names[0] == "interpreter, imports, settings"
    assert names[1] == "store open, interrupted update settled"
    assert names[2] == "verification (files as recorded when hashed, current)"
    assert names[3:] == [
        "fit check", "engine start (vLLM: weights, compile, CUDA graphs, KV cache)",
        "warm-up (smoke test)", "servers up, READY",
    ]  # fmt: skip
    assert all(seconds >= 0 for _, seconds in phases)
    assert phases[0][1] > 0.3  # this test process's interpreter and imports came before
    assert sum(seconds for _, seconds in phases) == pytest.approx(since_start)


async def test_row_s1_a_corrupt_current_falls_back_to_previous(box_b_current: Box) -> None:
    box = box_b_current
    _flip_byte((box.store.model_dir(box.versions["b"].version) / "fake-engine.json").resolve())
    assert await _serves(box) == box.versions["a"].version


async def test_row_s6_a_start_trusts_files_as_recorded_then_hashes_them_and_rolls_back(
    box_b_current: Box,
) -> None:
    """Bytes changed in place with the inode, size and mtime kept (what a disk's bit flip
    looks like): the start trusts the record, the full check after READY finds the change and
    the previous version serves."""
    box = box_b_current
    weights = (box.store.model_dir(box.versions["b"].version) / "fake-engine.json").resolve()
    before, text = weights.stat(), weights.read_text()
    os.chmod(weights, 0o644)
    weights.write_text(text.replace('"seed": 2', '"seed": 7'))  # still loads: another model
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.read_text() != text
    assert weights.stat().st_ino == before.st_ino
    async with in_process(box) as daemon:
        assert daemon.daemon.timeline.phases[2][0].startswith("verification (files as recorded")
        for _ in range(200):  # the check after READY runs in the background
            if (await daemon.status()).version == box.versions["a"].version:
                break
            await asyncio.sleep(0.1)
        assert (await daemon.generate()).model_version == box.versions["a"].version
    assert box.store.refs().current == box.versions["a"].version


async def test_row_s3_a_current_that_fails_to_load_falls_back_to_previous(box: Box) -> None:
    failing = box.add("fails", Behaviour(seed=3, start_error="CUDA out of memory"), current=True)
    assert await _serves(box) == box.versions["a"].version
    assert box.store.refs().current == failing.version  # a transient failure is retried next start


async def test_row_s2_a_current_that_does_not_fit_falls_back_to_previous(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    """Its widest layer's activations alone (2048 tokens x 2 x 2M x 4 bytes) outgrow the GPU."""
    huge = box.add("huge", quantized=False, intermediate_size=2_000_000, current=True)
    assert await _serves(box) == box.versions["a"].version
    assert f"cannot serve the current version: {huge.version} does not fit" in caplog.text
    assert box.store.refs().current == huge.version
    assert huge.version not in box.journal.bad  # it may fit another day


async def test_row_s3_a_current_whose_smoke_test_fails_falls_back_to_previous(
    box: Box, caplog: pytest.LogCaptureFixture
) -> None:
    mute = box.add("mute", Behaviour(seed=6, stream_error="device-side assert"), current=True)
    async with in_process(box) as daemon:
        assert (await daemon.generate()).model_version == box.versions["a"].version
        assert len(daemon.engines.live) == 1  # the smoke-tested engine was stopped
    assert "cannot serve the current version: smoke test failed" in caplog.text
    assert box.store.refs().current == mute.version
    assert mute.version not in box.journal.bad


async def test_row_s5_nothing_servable_names_every_reason(box_b_current: Box) -> None:
    box = box_b_current
    box.add("a-mute", Behaviour(seed=1, stream_error="no kernel image"))
    box.add("b-mute", Behaviour(seed=2, stream_error="no kernel image"), current=True)
    box.store.activate(box.versions["b-mute"].version)  # previous: a-mute
    box.store.activate(box.versions["a-mute"].version)
    box.store.activate(box.versions["b-mute"].version)
    daemon = Daemon(box.settings(), FakeEngines(), FakeProbe())
    with pytest.raises(NoServableVersionError) as refused:
        await daemon.serve(handle_signals=False)
    assert NoServableVersionError.exit_code == 10
    assert str(refused.value).count("smoke test failed: no kernel image") == 2


async def test_row_s4_a_previous_marked_bad_is_not_fallen_back_to(box_b_current: Box) -> None:
    box = box_b_current
    journal = box.journal
    journal.mark_bad(box.versions["a"].version, "failed its probation")
    _flip_byte((box.store.model_dir(box.versions["b"].version) / "fake-engine.json").resolve())
    daemon = Daemon(box.settings(), FakeEngines(), FakeProbe())
    with pytest.raises(NoServableVersionError, match="previous: marked bad: failed its probation"):
        await asyncio.wait_for(daemon.serve(handle_signals=False), 10)


def test_the_daemon_imports_neither_vllm_nor_torch_until_it_starts_an_engine() -> None:
    """A daemon's import must stay cheap: vLLM pulls torch in (~6 s on a small box), which the
    fake engines' daemons, the CLI and the tests started at once cannot all afford."""
    code = (
        "import sys, edgeagent.daemon, edgeagent.cli; "
        "print(sorted({'vllm', 'torch'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
