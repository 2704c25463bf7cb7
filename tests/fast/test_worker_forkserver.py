"""The CPU worker's fork server (edgeagent/engine/worker_forkserver.py), without vLLM.

A process made through its context (as vLLM's executor makes its worker) is spawned the first
time and its environment recorded; at the next engine start a server starts with that
environment, and the worker is forked from it; a worker whose environment differs in a
variable read at load time is spawned again, naming the variable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from edgeagent.engine import worker_forkserver
from edgeagent.timeline import STEPS_VARIABLE

BINDING = "EDGEAGENT_TEST_OMP_PLACES"  # stands for what vLLM sets just before its worker starts
PRELOAD = ("json",)  # light: what the server imports is not what is tested here


def _report(out: Connection) -> None:
    """In the worker: where it came from and what its environment and its parent's are."""
    parent = os.getppid()
    try:
        raw = Path(f"/proc/{parent}/environ").read_bytes()
        parent_environ = dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)
    except OSError:
        parent_environ = {}
    out.send({
        "parent": parent,
        "forked": worker_forkserver.forked_from_server,
        "binding": os.environ.get(BINDING),
        "steps": os.environ.get(STEPS_VARIABLE),
        "parent_binding": parent_environ.get(BINDING),
    })  # fmt: skip
    out.close()


def _start_worker() -> tuple[dict[str, Any], worker_forkserver.WorkerProcess]:
    context = worker_forkserver._CONTEXT
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_report, args=(writer,), name="VllmWorker-0", daemon=True)
    process.start()
    writer.close()
    assert reader.poll(60), "the worker did not report"
    report: dict[str, Any] = reader.recv()
    process.join(30)
    assert process.exitcode == 0
    return report, process


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv(BINDING, raising=False)
    monkeypatch.delenv(STEPS_VARIABLE, raising=False)
    yield tmp_path / "engine" / "cpu-worker-environment.json"
    worker_forkserver.stop()
    worker_forkserver.prepare(None)


def _first_start(monkeypatch: pytest.MonkeyPatch, record: Path) -> dict[str, Any]:
    """An engine start whose worker vLLM starts with BINDING set: what that worker reported."""
    worker_forkserver.prepare(record, PRELOAD)
    monkeypatch.setenv(BINDING, "{0}")
    report, _ = _start_worker()
    monkeypatch.delenv(BINDING)  # the next engine start begins before vLLM sets it again
    return report


def test_the_first_worker_is_spawned_and_its_environment_recorded(
    record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _first_start(monkeypatch, record)
    assert not report["forked"]
    assert report["binding"] == "{0}"
    assert worker_forkserver._server is None  # none to fork from on a first start
    assert json.loads(record.read_text())["set"] == {BINDING: "{0}"}


def test_a_later_worker_is_forked_from_a_server_started_with_the_recorded_environment(
    record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned = _first_start(monkeypatch, record)

    worker_forkserver.prepare(record, PRELOAD)
    server = worker_forkserver._server
    assert server is not None
    assert server.environ[BINDING] == "{0}"
    monkeypatch.setenv(BINDING, "{0}")
    monkeypatch.setenv(STEPS_VARIABLE, "/run/steps.tsv")  # read late: may differ
    forked, _ = _start_worker()

    assert not spawned["forked"]
    assert forked["forked"]
    assert forked["parent"] == server._forkserver_pid
    assert forked["parent_binding"] == "{0}"  # what a library read when the server loaded it
    assert forked["binding"] == "{0}"
    assert forked["steps"] == "/run/steps.tsv"


def test_a_worker_whose_environment_changed_is_spawned_and_says_why(
    record: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _first_start(monkeypatch, record)
    worker_forkserver.prepare(record, PRELOAD)
    monkeypatch.setenv(BINDING, "{1}")  # another binding than the server loaded with

    with caplog.at_level(logging.INFO, logger=worker_forkserver.__name__):
        report, _ = _start_worker()

    assert not report["forked"]
    assert report["binding"] == "{1}"
    assert f"its environment differs in {BINDING}" in caplog.text
    assert json.loads(record.read_text())["set"] == {BINDING: "{1}"}  # for the next start


def test_a_damaged_record_is_ignored(record: Path, caplog: pytest.LogCaptureFixture) -> None:
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"format": 1, "set": {"A": 1}, "unset": []}))
    with caplog.at_level(logging.WARNING, logger=worker_forkserver.__name__):
        worker_forkserver.prepare(record, PRELOAD)
    assert worker_forkserver._server is None
    assert "not a worker environment record" in caplog.text


def test_the_server_ends_when_the_daemon_stops_it(
    record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _first_start(monkeypatch, record)
    worker_forkserver.prepare(record, PRELOAD)
    server = worker_forkserver._server
    assert server is not None
    assert server.alive()

    worker_forkserver.stop()

    assert server.ended()
    assert worker_forkserver._server is None
