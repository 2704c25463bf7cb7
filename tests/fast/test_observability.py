"""Prometheus metrics scraped over real HTTP from a server fed by real requests (to a fake
engine); journald lines."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edgeagent.client import Parameters, build_request
from edgeagent.errors import ConfigError
from edgeagent.logs import JournalFormatter, journal_connected
from edgeagent.metrics import Metrics, MetricsServer, serve_metrics
from edgeagent.server.app import SERVICE_NAME, ApiServer
from edgeagent.server.health import SlotHealth
from edgeagent.server.service import GenerationService
from edgeagent.settings import LimitSettings, ServerSettings
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import FakeProbe
from fast.runner import Box, slot_and_updater


@pytest.fixture
async def observed(
    box: Box, tmp_path: Path
) -> AsyncIterator[tuple[pb_grpc.GenerationServiceStub, MetricsServer]]:
    slot, _ = await slot_and_updater(box)
    metrics = Metrics()
    metrics.watch_slot(slot)
    metrics.watch_device(FakeProbe())
    service = GenerationService(slot, LimitSettings(), metrics)
    server = ApiServer(service, SlotHealth(slot, [SERVICE_NAME]), ServerSettings(),
                       tmp_path / "app.sock")  # fmt: skip
    await server.start()
    exporter = serve_metrics(metrics, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 'app.sock'}") as channel:
            yield pb_grpc.GenerationServiceStub(channel), exporter  # type: ignore[no-untyped-call]
    finally:
        exporter.stop()
        await server.stop(grace=None)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def test_requests_tokens_latency_and_memory_are_exported(
    observed: tuple[pb_grpc.GenerationServiceStub, MetricsServer], box: Box
) -> None:
    stub, exporter = observed
    await stub.Generate(build_request("Hello", params=Parameters(max_tokens=5, temperature=0)))
    async for _ in stub.GenerateStream(build_request("Hi", params=Parameters(max_tokens=3))):
        pass
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(build_request("x", params=Parameters(max_tokens=5, temperature=-1)))

    samples = await asyncio.to_thread(_scrape, exporter.port)

    assert samples['edgeagent_requests_total{code="OK",method="Generate"}'] == 1
    assert samples['edgeagent_requests_total{code="OK",method="GenerateStream"}'] == 1
    assert samples['edgeagent_requests_total{code="INVALID_ARGUMENT",method="Generate"}'] == 1
    assert samples["edgeagent_generated_tokens_total"] == 8
    assert samples["edgeagent_prompt_tokens_total"] >= 2
    assert samples["edgeagent_time_to_first_token_seconds_count"] == 2
    assert 0 < samples["edgeagent_time_to_first_token_seconds_sum"] < 30
    assert samples["edgeagent_request_duration_seconds_count"] == 3
    assert samples["edgeagent_requests_running"] == 0
    assert samples["edgeagent_requests_waiting"] == 0
    a = box.versions["a"]
    (info,) = [name for name in samples if name.startswith("edgeagent_serving_info{")]
    assert samples[info] == 1
    for label in (f'model_id="{a.model_id}"', f'version="{a.version}"', 'state="serving"',
                  'hub_commit=""', f'quantization="{a.quantization_label}"'):  # fmt: skip
        assert label in info
    memory = [v for k, v in samples.items() if k.startswith("edgeagent_device_memory_used_bytes")]
    assert len(memory) == 1
    assert memory[0] > 0


def test_metrics_listen_on_loopback_only() -> None:
    with pytest.raises(ConfigError, match="loopback only"):
        serve_metrics(Metrics(), "0.0.0.0:9464")
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        serve_metrics(Metrics(), "127.0.0.1:metrics")


def test_journal_lines_carry_their_priority_on_every_line() -> None:
    formatter = JournalFormatter()
    record = logging.LogRecord(
        "edgeagent.daemon", logging.WARNING, __file__, 1, "hold %s", ("on",), None
    )
    try:
        raise ValueError("boom")
    except ValueError:
        failure = logging.LogRecord(
            "edgeagent.x", logging.ERROR, __file__, 2, "failed", (), sys.exc_info()
        )
    assert formatter.format(record) == "<4>edgeagent.daemon: hold on"
    lines = formatter.format(failure).splitlines()
    assert lines[0] == "<3>edgeagent.x: failed"
    assert len(lines) > 2
    assert all(re.match(r"<3>", line) for line in lines)


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream, io.StringIO() as memory:
        stat = os.fstat(stream.fileno())
        ours = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        other = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"}
        assert journal_connected(stream, ours)
        assert not journal_connected(stream, other)
        assert not journal_connected(stream, {})
        assert not journal_connected(memory, ours)  # no file descriptor
