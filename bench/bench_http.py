"""The daemon over its OpenAI-compatible HTTP API (server-sent events of /v1/completions) vs the
daemon over gRPC vs vLLM's `AsyncLLM` called directly: same model, same run, interleaved.

Prints a Markdown table of decode tokens/s per stream, aggregate tokens/s, time to first token,
the gRPC/raw and HTTP/raw ratios and what HTTP adds to gRPC's time to first token, at 1 and 32
concurrent streams (others with --streams).

    .venv/bin/python bench/bench_http.py [--model DIR | --state DIR] [--rounds 5] [--streams 1 32]
        [--kv-cache-gib 0.5] [--max-num-seqs 32] [--max-model-len N] [--prompt-tokens N]
        [--http-client aiohttp [httpx]]

All sides get the same sizes, prompts and seeds, and take turns going first. An HTTP side is
one shared client on the daemon's Unix socket (`RUNTIME_DIR/openai.sock`), one side for each
client named: aiohttp (C parser; the default) and httpx (pure Python, whose own cost at 32
streams arriving together is ~10 ms of time to first token on a slow CPU, measured against a
bare socket), so `--http-client aiohttp httpx` measures both against the same gRPC and raw
sides. Its time to first token is that of the first event carrying text, and its tokens are
the final usage event's `completion_tokens`. The functions and options are bench_serving.py's.

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import functools
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import grpc
from bench_serving import (
    Prompts,
    RunOne,
    Sample,
    Trial,
    daemon_stream,
    prepare_store,
    raw_stream,
    serving_parser,
    sizes_of,
    start_daemon,
    start_raw,
    trial,
)

from edgeagent.v1 import generation_pb2_grpc as pb_grpc

try:
    import httpx
except ImportError:  # a host without httpx may have its fork, same API
    import httpx2 as httpx  # type: ignore[import-not-found, no-redef]

READY_WITHIN_S = 60.0
BASE = "http://localhost"


class HttpSide(Protocol):
    """One client for every stream: enough connections for 32 at once, and no read timeout
    short enough to cut a stream that waits for its turn in the engine."""

    async def get(self, path: str) -> tuple[int, Any]: ...

    def post_lines(self, path: str, body: dict[str, Any]) -> AsyncGenerator[str, None]:
        """The response's lines; a status other than 200 raises with the body."""
        ...

    async def close(self) -> None: ...


class AiohttpSide:
    def __init__(self, socket_path: Path) -> None:
        connector = aiohttp.UnixConnector(path=str(socket_path), limit=64)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=600.0)
        )

    async def get(self, path: str) -> tuple[int, Any]:
        async with self._session.get(BASE + path) as response:
            return response.status, await response.json(content_type=None)

    async def post_lines(self, path: str, body: dict[str, Any]) -> AsyncGenerator[str, None]:
        async with self._session.post(BASE + path, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"POST {path}: {response.status} {await response.text()}")
            async for raw in response.content:
                yield raw.decode().rstrip("\r\n")

    async def close(self) -> None:
        await self._session.close()


class HttpxSide:
    def __init__(self, socket_path: Path) -> None:
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
            timeout=httpx.Timeout(600.0),
        )

    async def get(self, path: str) -> tuple[int, Any]:
        answer = await self._client.get(BASE + path)
        return answer.status_code, answer.json()

    async def post_lines(self, path: str, body: dict[str, Any]) -> AsyncGenerator[str, None]:
        async with self._client.stream("POST", BASE + path, json=body) as answer:
            if answer.status_code != 200:
                await answer.aread()
                raise RuntimeError(f"POST {path}: {answer.status_code} {answer.text}")
            async for line in answer.aiter_lines():
                yield line

    async def close(self) -> None:
        await self._client.aclose()


HTTP_CLIENTS: dict[str, Callable[[Path], HttpSide]] = {"aiohttp": AiohttpSide, "httpx": HttpxSide}


async def wait_http_ready(
    client: HttpSide, daemon: subprocess.Popen[bytes], socket_path: Path
) -> str:
    """Wait until GET /ready answers 200 (the HTTP API starts just after gRPC's); return the
    served model's id from GET /v1/models."""
    deadline = time.monotonic() + READY_WITHIN_S
    while True:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited ({daemon.returncode}) before {socket_path} was up")
        try:
            if (await client.get("/ready"))[0] == 200:
                break
        except (httpx.TransportError, aiohttp.ClientConnectionError):
            pass  # the socket is not there yet
        if time.monotonic() > deadline:
            raise SystemExit(f"{socket_path}: GET /ready not 200 within {READY_WITHIN_S:.0f} s")
        await asyncio.sleep(0.1)
    status, models = await client.get("/v1/models")
    if status != 200:
        raise SystemExit(f"GET /v1/models: {status} {models}")
    return str(models["data"][0]["id"])


async def http_stream(
    client: HttpSide, model_id: str, prompt: str, max_tokens: int, seed: int
) -> Sample:
    body = {
        "model": model_id,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, chunks, usage_tokens = 0.0, 0, None
    async for line in client.post_lines("/v1/completions", body):
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            break
        event: dict[str, Any] = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"POST /v1/completions: {event['error']}")
        if event.get("usage"):
            usage_tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices") or ():
            if choice.get("text"):
                if chunks == 0:
                    first = time.perf_counter() - started
                chunks += 1
    tokens = usage_tokens if usage_tokens is not None else chunks
    return Sample(first, tokens, time.perf_counter() - started)


def row(streams: int, client: str, results: dict[str, list[Trial]]) -> str:
    def per_stream(trials: list[Trial], key: str) -> float:
        return statistics.median(getattr(s, key) for t in trials for s in t.samples)

    def aggregate(trials: list[Trial]) -> float:
        return statistics.median(t.aggregate_tok_s for t in trials)

    raw, over_grpc, over_http = results["raw"], results["gRPC"], results[client]
    r_dec, g_dec, h_dec = (per_stream(t, "decode_tok_s") for t in (raw, over_grpc, over_http))
    r_agg, g_agg, h_agg = (aggregate(t) for t in (raw, over_grpc, over_http))
    r_ttft, g_ttft, h_ttft = (per_stream(t, "ttft_s") * 1000 for t in (raw, over_grpc, over_http))
    return (
        f"| {streams} | {client} | {r_dec:.0f} | {g_dec:.0f} | {g_dec / r_dec:.3f} | "
        f"{h_dec:.0f} | {h_dec / r_dec:.3f} | {r_agg:.0f} | {g_agg:.0f} | {g_agg / r_agg:.3f} | "
        f"{h_agg:.0f} | **{h_agg / r_agg:.3f}** | {r_ttft:.1f} | {g_ttft:.1f} | {h_ttft:.1f} | "
        f"{h_ttft - g_ttft:+.1f} |"
    )


async def main() -> None:
    parser = serving_parser(streams=32, max_num_seqs=32)
    parser.add_argument("--prompt-tokens", type=int, default=0)
    parser.add_argument(
        "--http-client",
        nargs="+",
        choices=list(HTTP_CLIENTS),
        default=["aiohttp"],
        help="one HTTP side for each, all in the same run",
    )
    args = parser.parse_args()
    sizes = sizes_of(args)
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-bench-"))
    state_dir = args.state or workdir / "state"
    model = prepare_store(state_dir, args.model, reuse=args.state is not None)
    prompts = Prompts(model, args.prompt_tokens)
    http_socket = workdir / "run" / "openai.sock"  # start_daemon's runtime dir; said explicitly
    http_env = {
        "EDGEAGENT_SERVER__HTTP_ENABLED": "true",
        "EDGEAGENT_SERVER__HTTP_SOCKET_PATH": str(http_socket),
    }
    daemon, target = start_daemon(workdir, state_dir, args.cache, sizes, extra_env=http_env)
    clients = {name: HTTP_CLIENTS[name](http_socket) for name in dict.fromkeys(args.http_client)}
    sides = ["raw", "gRPC", *clients]
    results: dict[int, dict[str, list[Trial]]] = {n: {s: [] for s in sides} for n in args.streams}
    llm, model_id = None, ""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            for client in clients.values():
                model_id = await wait_http_ready(client, daemon, http_socket)
            llm = start_raw(model, sizes)
            stub = pb_grpc.GenerationServiceStub(channel)
            runners: dict[str, RunOne] = {
                "raw": lambda m, s: raw_stream(llm, prompts(s), m, s),
                "gRPC": lambda m, s: daemon_stream(stub, prompts(s), m, s),
            }
            for name, client in clients.items():
                runners[name] = functools.partial(_http_runner, client, model_id, prompts)
            for warm in runners.values():
                await trial(warm, max(args.streams), args.max_tokens, 0)
            for round_ in range(1, args.rounds + 1):
                for streams in args.streams:
                    shift = round_ % len(sides)  # rotate who goes first
                    for side in (*sides[shift:], *sides[:shift]):
                        result = await trial(runners[side], streams, args.max_tokens, round_)
                        results[streams][side].append(result)
    finally:
        for client in clients.values():
            await client.close()
        if llm is not None:
            llm.shutdown()
        daemon.terminate()
        daemon.wait(timeout=60)
    print(
        f"\n{args.rounds} interleaved rounds ({', '.join(sides)} in rotating order), "
        f"{args.max_tokens} tokens per stream, {args.prompt_tokens or 'short'} prompt tokens, "
        f"{sizes}, model {model} (served as {model_id!r})"
    )
    print(
        "| streams | HTTP client | raw decode tok/s/stream | gRPC | gRPC/raw | HTTP | HTTP/raw | "
        "raw aggregate tok/s | gRPC | gRPC/raw | HTTP | HTTP/raw | raw TTFT ms | gRPC TTFT ms | "
        "HTTP TTFT ms | HTTP-gRPC TTFT ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for streams, by_side in results.items():
        for client in clients:
            print(row(streams, client, by_side))


def _http_runner(
    client: HttpSide, model_id: str, prompts: Prompts, max_tokens: int, seed: int
) -> Awaitable[Sample]:
    return http_stream(client, model_id, prompts(seed), max_tokens, seed)


if __name__ == "__main__":
    asyncio.run(main())
