"""The start timeline's steps from other processes, and the engine core forked from the daemon
(no engine: a plain forked process stands in for vLLM's engine core)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
import warnings
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from edgeagent.engine import start_steps
from edgeagent.engine.core_fork import METHOD_VARIABLE, forked_engine_core
from edgeagent.timeline import REST, STEPS_VARIABLE, SUBSTEP_INDENT, StartTimeline, record_step


@pytest.fixture
def timeline(tmp_path: Path) -> Iterator[StartTimeline]:
    timeline = StartTimeline(origin=time.monotonic())
    timeline.collect_steps(tmp_path / "run" / "start-steps.tsv")
    yield timeline
    timeline.stop_collecting()


def test_steps_recorded_during_a_phase_are_its_substeps_and_sum_to_it(
    timeline: StartTimeline, tmp_path: Path
) -> None:
    record_step("before the phase")
    timeline.mark("settings")
    time.sleep(0.01)
    record_step("worker process started", at=time.monotonic() - 0.005)  # from /proc: the past
    record_step("worker: imports")
    time.sleep(0.01)
    timeline.split("engine start", 10.0, "smoke test")
    timeline.stop_collecting()
    record_step("after the start: dropped")
    assert not (tmp_path / "run" / "start-steps.tsv").exists()
    assert STEPS_VARIABLE not in os.environ

    names = [name for name, _ in timeline.rows]
    assert names == [
        "settings",
        SUBSTEP_INDENT + "before the phase",
        SUBSTEP_INDENT + REST,
        "engine start",
        SUBSTEP_INDENT + "worker process started",
        SUBSTEP_INDENT + "worker: imports",
        SUBSTEP_INDENT + REST,
        "smoke test",
    ]
    for index, (_, seconds) in enumerate(timeline.phases):
        steps = timeline.substeps.get(index)
        if steps:
            assert sum(s for _, s in steps) == pytest.approx(seconds, abs=1e-9)
    assert all(seconds >= 0 for _, seconds in timeline.rows)
    assert "    worker: imports" in timeline.table()


def test_a_log_line_of_vllm_ends_its_step_and_other_lines_do_not(timeline: StartTimeline) -> None:
    start_steps.install_log_hook()
    start_steps.install_log_hook()  # once per process, however often vLLM loads its plugins
    logging.getLogger("vllm.test").warning("Loading weights took %.2f seconds", 0.5)
    logging.getLogger("vllm.test").warning("%sDynamo bytecode transform time: %.2f s", "", 2.0)
    logging.getLogger("other").warning("Loading weights took %.2f seconds", 0.5)
    timeline.mark("engine start")
    assert [name.strip() for name, _ in timeline.rows[1:]] == [
        "daemon: model built, weights read", "daemon: Dynamo bytecode transform", REST,
    ]  # fmt: skip


def _report(out: Connection) -> None:
    """In the forked child: its start method for workers, whether a signal would still reach
    the parent's event loop, and whether a library's DeprecationWarning would raise there."""
    try:
        warnings.warn("deprecated", DeprecationWarning, stacklevel=1)
        raised = False
    except DeprecationWarning:
        raised = True
    out.send((os.environ.get(METHOD_VARIABLE), signal.set_wakeup_fd(-1), raised))


def test_the_forked_engine_core_keeps_nothing_of_the_daemons_signals_and_spawns_its_worker(
    timeline: StartTimeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(METHOD_VARIABLE, "spawn")  # what vLLM's CPU platform asks for
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno())  # as the daemon's event loop has it
    try:
        receive, send = multiprocessing.Pipe(duplex=False)
        with forked_engine_core(), warnings.catch_warnings():
            warnings.simplefilter("error")  # as the test runner has them: not the engine's
            assert os.environ[METHOD_VARIABLE] == "fork"
            child = multiprocessing.get_context("fork").Process(target=_report, args=(send,))
            child.start()
        child.join(timeout=30)
        assert receive.recv() == ("spawn", -1, False)
        assert os.environ[METHOD_VARIABLE] == "spawn"
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()
    timeline.mark("engine start")
    assert timeline.rows[1][0].strip() == "daemon: AsyncLLM set up, engine core forked"
