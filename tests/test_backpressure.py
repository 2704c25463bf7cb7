"""A flood on the real engine: 500 streams from one client, which is then SIGKILLed once the
daemon has answered every one (admitted or refused). vLLM itself then reports nothing running
and nothing waiting before the queued streams could have run, the daemon's memory is back to
where it was, and the next client is served at its normal speed.

Every wait is for a state the daemon reports (its metrics), never a time sized on one machine:
a CPU without AVX-512 decodes 4-bit several times slower."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import REPO
from launcher import Launched
from real_daemon import start_daemon
from waits import HANG_S

from edgeagent.client import Client, Parameters

STREAMS, MAX_TOKENS, BATCH = 500, 900, 8
FLOOD = (
    f"MAX_TOKENS = {MAX_TOKENS}\n"
    + """
import asyncio, sys
import grpc
from edgeagent.client import Parameters, build_request
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

async def main(target, count):
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.GenerationServiceStub(channel)
    request = build_request("flood", params=Parameters(max_tokens=MAX_TOKENS, temperature=0))
    calls = [stub.GenerateStream(request) for _ in range(count)]
    print("sent", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in lines if not line.startswith("#"))
    }


def _rss_bytes(daemon: Launched) -> int:
    total = 0
    for pid in [daemon.process.pid, *daemon.children()]:
        status = Path(f"/proc/{pid}/status").read_text()
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines()
                      if line.startswith("VmRSS:"))  # fmt: skip
    return total


def _speed_regained(daemon: Launched, normal: float, attempts: int = 5) -> float:
    """The best speed of a few tries: a 2-core machine's noise (CI's) can slow one try, while
    work the killed client left in the engine would slow every try."""
    best = 0.0
    for _ in range(attempts):
        best = max(best, _tokens_per_s(daemon))
        if best > normal:
            break
    return best


def _tokens_per_s(daemon: Launched) -> float:
    """The best of three 64-token answers: one answer is too short to time alone."""
    speeds = []
    with Client(daemon.target, timeout=120) as client:
        for _ in range(3):
            started = time.perf_counter()
            answer = client.generate("Measure me", Parameters(max_tokens=64, temperature=0))
            speeds.append(answer.completion_tokens / (time.perf_counter() - started))
    return max(speeds)


async def test_a_flood_from_a_killed_client_leaves_the_engine_idle(
    tmp_path: Path, tiny_model: Path
) -> None:
    port = _free_port()
    daemon = await asyncio.to_thread(
        start_daemon, tmp_path, 10.0, tiny_model, EDGEAGENT_METRICS__ADDRESS=f"127.0.0.1:{port}",
        EDGEAGENT_MODEL__MAX_NUM_SEQS="8",
    )  # fmt: skip
    try:
        await asyncio.to_thread(_tokens_per_s, daemon)  # warm
        speed_before = await asyncio.to_thread(_tokens_per_s, daemon)
        memory_before = _rss_bytes(daemon)
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD, daemon.target, str(STREAMS), stdout=subprocess.PIPE,
            env={"PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert flood.stdout is not None
        assert await flood.stdout.readline() == b"sent\n"
        during = await _until(port, _every_stream_answered)
        flood.send_signal(signal.SIGKILL)
        await flood.wait()
        killed = time.monotonic()
        after = await _until(port, _idle)
        idle_after_s = time.monotonic() - killed
        memory_after = _rss_bytes(daemon)
        speed_after = await asyncio.to_thread(_speed_regained, daemon, 0.8 * speed_before)
    finally:
        exit_code = await asyncio.to_thread(daemon.terminate, 60)
    assert exit_code == 0
    refused = _refused(during)
    assert during["edgeagent_engine_requests_running"] == BATCH
    assert refused >= STREAMS - BATCH - 64
    # Run to their ends, the streams admitted at the kill would have generated their tokens;
    # aborted, they stop within a few steps (at most the running batch's rest).
    generated_after_kill = _generated(after) - _generated(during)
    assert generated_after_kill < BATCH * MAX_TOKENS
    assert memory_after < memory_before * 1.1
    assert speed_after > 0.8 * speed_before
    print(f"\nflood of {STREAMS}: {refused:.0f} refused at once; idle {idle_after_s:.2f} s "
          f"({generated_after_kill:.0f} tokens) after the client died; memory "
          f"{memory_before / 2**20:.0f} -> {memory_after / 2**20:.0f} MiB; "
          f"{speed_before:.0f} -> {speed_after:.0f} tok/s")  # fmt: skip


def _refused(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("edgeagent_requests_refused_total"))


def _generated(metrics: dict[str, float]) -> float:
    return metrics["edgeagent_generated_tokens_total"]


def _every_stream_answered(metrics: dict[str, float]) -> bool:
    """Each stream of the flood admitted (under way) or refused: none left unanswered."""
    return _refused(metrics) + metrics["edgeagent_requests_running"] >= STREAMS


def _idle(metrics: dict[str, float]) -> bool:
    return (metrics["edgeagent_engine_requests_running"], metrics["edgeagent_requests_running"],
            metrics["edgeagent_engine_requests_waiting"]) == (0, 0, 0)  # fmt: skip


async def _until(port: int, reached: Callable[[dict[str, float]], bool]) -> dict[str, float]:
    """The daemon's metrics once `reached` holds of them."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        metrics = await asyncio.to_thread(_scrape, port)
        if reached(metrics):
            return metrics
        await asyncio.sleep(0.05)
    raise AssertionError(f"not {reached.__name__} after {HANG_S} s: {metrics}")
