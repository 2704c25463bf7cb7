"""Bursts of streams arriving together, against one daemon, over gRPC and over OpenAI HTTP: the
time to first token of each burst, for profiling what the daemon does per arriving request.

    python bench/burst_ttft.py [--streams 32] [--seconds 25] [--sides grpc http]

Starts a daemon on the random-weight tiny model built like the embedded default (compile cache
in .cache), prints its PID (attach a profiler, e.g. `py-spy record -p PID -d 40 -f raw -o
profile.txt`), then for each side sends bursts of `--streams` short requests (4 tokens) for
`--seconds` and prints the median over bursts of each burst's median time to first token. The
HTTP side reads with aiohttp. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from bench_http import AiohttpSide, http_stream, wait_http_ready
from bench_serving import Sample, Sizes, daemon_stream, prepare_store, start_daemon

from edgeagent.v1 import generation_pb2_grpc as pb_grpc

PROMPT = "Tell me about bridges"
TOKENS = 4


async def bursts(
    send_one: Callable[[int], Awaitable[Sample]], streams: int, seconds: float
) -> list[float]:
    medians, ends_at = list[float](), time.monotonic() + seconds
    while time.monotonic() < ends_at:
        samples = await asyncio.gather(*(send_one(i) for i in range(streams)))
        medians.append(1000 * statistics.median(sample.ttft_s for sample in samples))
    return medians


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-burst-"))
    model = prepare_store(workdir / "state", None, reuse=False)
    sizes = Sizes(kv_cache_gib=0.5, max_num_seqs=args.streams, max_model_len=None,
                  max_num_batched_tokens=2048)  # fmt: skip
    http_socket = workdir / "run" / "openai.sock"
    daemon, target = start_daemon(
        workdir, workdir / "state", args.cache, sizes,
        extra_env={"EDGEAGENT_SERVER__HTTP_ENABLED": "true",
                   "EDGEAGENT_SERVER__HTTP_SOCKET_PATH": str(http_socket)},
    )  # fmt: skip
    client = AiohttpSide(http_socket)
    try:
        model_id = await wait_http_ready(client, daemon, http_socket)
        print(f"daemon PID {daemon.pid}, model {model}", flush=True)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            sides = {
                "grpc": lambda seed: daemon_stream(stub, PROMPT, TOKENS, seed),
                "http": lambda seed: http_stream(client, model_id, PROMPT, TOKENS, seed),
            }
            for side in args.sides:
                medians = await bursts(sides[side], args.streams, args.seconds)
                print(f"{side}: {len(medians)} bursts of {args.streams} streams, time to first "
                      f"token {statistics.median(medians):.1f} ms (median of burst medians)",
                      flush=True)  # fmt: skip
    finally:
        await client.close()
        daemon.terminate()
        daemon.wait(timeout=60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--sides", nargs="+", choices=["grpc", "http"], default=["grpc", "http"])
    parser.add_argument("--cache", type=Path, default=Path(".cache").absolute())
    asyncio.run(main(parser.parse_args()))
