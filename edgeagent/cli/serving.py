"""Commands that run or talk to the daemon: serve, generate, info, demo, config, make-tiny."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from edgeagent.client import Client, Parameters, describe_rpc_error
from edgeagent.errors import EdgeAgentError
from edgeagent.logs import setup_logging
from edgeagent.v1 import generation_pb2 as pb

EXIT_RPC_FAILED = 3


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.set_defaults(handler=_serve)

    generate = commands.add_parser("generate", help="stream an answer to the terminal")
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="send as a user chat message")
    generate.add_argument("--system", help="a system message (implies --chat)")
    generate.add_argument("--max-tokens", type=int)
    generate.add_argument("--temperature", type=float)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--target", help="gRPC target; default: the daemon's Unix socket")
    generate.add_argument("--timeout", type=float, help="seconds before the request is cancelled")
    generate.set_defaults(handler=_generate)

    health = commands.add_parser(
        "health", help="exit 0 once the daemon serves (a probe for deploy scripts)"
    )
    health.add_argument("--target")
    health.add_argument("--wait", type=float, default=0, help="seconds to wait for it to serve")
    health.set_defaults(handler=_health)

    info = commands.add_parser("info", help="show the served model")
    info.add_argument("--target")
    info.set_defaults(handler=_info)

    demo = commands.add_parser("demo", help="start the daemon, stream one chat answer, stop it")
    demo.add_argument("--prompt", default="Tell me about edge boxes in one short paragraph.")
    demo.set_defaults(handler=_demo)

    tiny = commands.add_parser("make-tiny", help="write the embedded tiny Phi-4-family model")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_make_tiny)

    config = commands.add_parser("config", help="print the effective configuration")
    config.set_defaults(handler=_config)


def _serve(args: argparse.Namespace) -> int:
    from edgeagent.daemon import Daemon
    from edgeagent.settings import Settings

    settings = Settings()
    setup_logging(settings.log_level)
    try:
        return asyncio.run(Daemon(settings).serve())
    except EdgeAgentError as error:
        logging.getLogger("edgeagent").error("cannot serve: %s", error)
        return error.exit_code


def _generate(args: argparse.Namespace) -> int:
    params = Parameters(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
    )
    with Client(args.target, timeout=args.timeout) as client:
        if args.chat or args.system:
            messages = [("system", args.system)] if args.system else []
            responses = client.chat([*messages, ("user", args.prompt)], params)
        else:
            responses = client.stream(args.prompt, params)
        return _print_stream(responses)


def _print_stream(responses: Iterator[pb.GenerateStreamResponse]) -> int:
    """Print text as it arrives, then one line of timing on stderr."""
    started = time.perf_counter()
    first: float | None = None
    last = pb.GenerateStreamResponse()
    try:
        for last in responses:
            if first is None:
                first = time.perf_counter() - started
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except grpc.RpcError as error:
        newline = "\n" if first is not None else ""
        print(f"{newline}error: {describe_rpc_error(error)}", file=sys.stderr)
        return EXIT_RPC_FAILED
    elapsed = time.perf_counter() - started
    decode = elapsed - (first or 0.0)
    rate = (last.completion_tokens - 1) / decode if decode > 0 and last.completion_tokens > 1 else 0
    print(
        f"\n--- {last.prompt_tokens} prompt tokens, {last.completion_tokens} generated in "
        f"{elapsed:.2f} s; first token {1000 * (first or 0):.0f} ms; {rate:.0f} tok/s; "
        f"finish: {pb.FinishReason.Name(last.finish_reason)}",
        file=sys.stderr,
    )
    return 0


def _health(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        try:
            client.wait_until_serving(timeout=args.wait)
        except TimeoutError as error:
            print(f"not serving: {error}", file=sys.stderr)
            return EXIT_RPC_FAILED
    print(f"serving on {client.target}")
    return 0


def _info(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        info = client.model_info()
    for field, value in info.ListFields():
        print(f"{field.name:>24}  {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The quick start: the whole pipeline on the embedded model, then a clean stop.

    An empty store is filled by building the tiny model to 4-bit GPTQ with AutoRound.
    """
    from edgeagent.settings import Settings

    settings = Settings()
    log_path = settings.state_dir / "demo-daemon.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"starting the daemon (log: {log_path}); the first start builds the 4-bit model "
        "with AutoRound and compiles it..."
    )
    started = time.perf_counter()
    env = {"EDGEAGENT_MODEL__SOURCE": "embedded", **os.environ}
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        with Client(f"unix:{settings.socket_path}", timeout=120) as client:
            try:
                client.wait_until_serving(timeout=900, daemon=daemon)
            except (RuntimeError, TimeoutError) as error:
                raise SystemExit(f"{error}; see {log_path}") from None
            print(f"serving after {time.perf_counter() - started:.1f} s")
            _info_lines(client.model_info())
            print(f"\n> {args.prompt}\n")
            code = _print_stream(client.chat([("user", args.prompt)], Parameters(max_tokens=96)))
    finally:
        daemon.send_signal(signal.SIGTERM)
        exit_code = daemon.wait(timeout=120)
    print(f"daemon stopped on SIGTERM with exit code {exit_code}")
    return code or exit_code


def _info_lines(info: pb.ModelInfo) -> None:
    print(
        f"model {info.model_id} version {info.version} ({info.architecture}, "
        f"quantization {info.quantization}), context {info.max_context_tokens} tokens"
    )


def _make_tiny(args: argparse.Namespace) -> int:
    from edgeagent.artifacts.tiny import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return 0


def _config(args: argparse.Namespace) -> int:
    from edgeagent.settings import Settings

    print(json.dumps(Settings().redacted(), indent=2, sort_keys=True))
    return 0
