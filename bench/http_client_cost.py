"""What an HTTP client library itself adds to the time to first token when many streams start
together: a trivial FastAPI app on uvicorn (the daemon's stack) answers each POST with one
server-sent event at once, over a Unix socket, and N requests are sent at the same moment with
httpx, with aiohttp, and with a bare socket (one hand-written request, read until the first
event). The server is the same for all three, so the differences are the clients'.

    python bench/http_client_cost.py [--streams 32] [--rounds 5]

Prints the median and the slowest first event of each round, per client, in milliseconds.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench_http import HTTP_CLIENTS, HttpSide

BODY = {"prompt": "hi", "max_tokens": 8, "stream": True}
FIRST_EVENT = b"data: {"
SERVER = """
import sys
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()

@app.post("/v1/completions")
async def completions(body: dict) -> StreamingResponse:
    async def events():
        yield b'data: {"choices": [{"text": "x"}]}\\n\\n'
        yield b"data: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")

uvicorn.run(app, uds=sys.argv[1], log_level="warning")
"""

Send = Callable[[float], Awaitable[float]]


def with_client(client: HttpSide) -> Send:
    async def send(started: float) -> float:
        async with contextlib.aclosing(client.post_lines("/v1/completions", BODY)) as lines:
            async for line in lines:
                if line.startswith(FIRST_EVENT.decode()):
                    break
        return time.perf_counter() - started

    return send


def with_socket(path: str) -> Send:
    body = json.dumps(BODY).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )

    async def send(started: float) -> float:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(request)
        received = b""
        while FIRST_EVENT not in received:
            received += await reader.read(4096)
        writer.close()
        return time.perf_counter() - started

    return send


async def measure(name: str, send: Send, streams: int, rounds: int) -> None:
    await asyncio.gather(*(send(time.perf_counter()) for _ in range(streams)))  # warm-up
    for round_ in range(1, rounds + 1):
        started = time.perf_counter()
        firsts = await asyncio.gather(*(send(started) for _ in range(streams)))
        median, slowest = 1000 * statistics.median(firsts), 1000 * max(firsts)
        print(f"{name:8} round {round_}: {streams} streams, first event median {median:.1f} ms, "
              f"slowest {slowest:.1f} ms")  # fmt: skip


async def main(args: argparse.Namespace, path: Path) -> None:
    for name, side in HTTP_CLIENTS.items():
        client = side(path)
        try:
            await measure(name, with_client(client), args.streams, args.rounds)
        finally:
            await client.close()
    await measure("socket", with_socket(str(path)), args.streams, args.rounds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    socket_path = Path(tempfile.mkdtemp(prefix="edgeagent-http-")) / "s.sock"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(socket_path)])
    try:
        while not socket_path.exists():
            time.sleep(0.05)
        asyncio.run(main(arguments, socket_path))
    finally:
        server.terminate()
        server.wait(timeout=10)
