"""Commands that run or watch the daemon: serve, health, info, demo, config, make-tiny."""

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
from google.protobuf.message import Message as Message_

from edgeagent.cli.streams import print_stream
from edgeagent.client import Client, Parameters
from edgeagent.errors import EdgeAgentError
from edgeagent.logs import setup_logging
from edgeagent.v1 import generation_pb2 as pb

EXIT_RPC_FAILED = 3


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.set_defaults(handler=_serve)

    health = commands.add_parser(
        "health", help="exit 0 once the daemon serves (a probe for deploy scripts)"
    )
    health.add_argument("--target")
    health.add_argument("--wait", type=float, default=0, help="seconds to wait for it to serve")
    health.set_defaults(handler=_health)

    info = commands.add_parser(
        "info", help="show the served model, the engine, its load and the request limits"
    )
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
        try:
            info: pb.ServerInfo | pb.ModelInfo = client.server_info()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            info = client.model_info()  # a daemon from before GetServerInfo
    for line in _info_fields(info):
        print(line)
    return 0


def _info_fields(message: Message_) -> Iterator[str]:
    """Each field of `message`, zero values included; a nested message as its own section."""
    for field_ in message.DESCRIPTOR.fields:
        value = getattr(message, field_.name)
        if isinstance(value, Message_):
            yield f"{field_.name}:"
            yield from _info_fields(value)
        else:
            yield f"{field_.name:>26}  {_info_value(field_.name, value)}"


def _info_value(name: str, value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1%}" if name.endswith("_usage") else f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and name.endswith("_bytes"):
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size:
                return f"{value} ({value / size:.1f} {unit})"
    return str(value)


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
            code = print_stream(client.chat([("user", args.prompt)], Parameters(max_tokens=96)))
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
