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
import threading
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

    An empty store is filled here, in the foreground, so each phase shows its progress: the
    tiny model is trained (once; cached), then quantized to 4-bit GPTQ with AutoRound. The
    daemon then loads, compiles and warms up the engine; its log is followed for those phases.
    """
    from edgeagent.settings import Settings

    settings = Settings()
    _prepare_embedded(settings)
    log_path = settings.state_dir / "demo-daemon.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting the daemon (log: {log_path})", flush=True)
    started = time.perf_counter()
    env = {"EDGEAGENT_MODEL__SOURCE": "embedded", **os.environ}
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgeagent", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    serving = threading.Event()
    follower = threading.Thread(
        target=_follow_phases, args=(log_path, serving, started), daemon=True
    )
    follower.start()
    try:
        _wait_for_socket(settings.socket_path, daemon, log_path)
        with Client(f"unix:{settings.socket_path}", timeout=120) as client:
            try:
                client.wait_until_serving(timeout=900, daemon=daemon)
            except (RuntimeError, TimeoutError) as error:
                raise SystemExit(f"{error}; see {log_path}") from None
            finally:
                serving.set()
                follower.join(timeout=2)
            print(f"serving after {time.perf_counter() - started:.1f} s")
            _info_lines(client.model_info())
            print(f"\n> {args.prompt}\n")
            code = print_stream(client.chat([("user", args.prompt)], Parameters(max_tokens=96)))
    finally:
        daemon.send_signal(signal.SIGTERM)
        exit_code = daemon.wait(timeout=120)
    print(f"daemon stopped on SIGTERM with exit code {exit_code}")
    return code or exit_code


def _wait_for_socket(path: Path, daemon: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait for the daemon's socket before the first connection: a gRPC channel that fails to
    connect for minutes backs off for up to a minute between tries, and the demo would notice
    that the daemon serves only that much later."""
    deadline = time.monotonic() + 900
    while not path.exists():
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with code {daemon.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"no socket at {path} after 900 s; see {log_path}")
        time.sleep(0.25)


def _prepare_embedded(settings: Any) -> None:
    """Train and quantize the embedded model into an empty store, each phase on screen."""
    from edgeagent.sources.build import build_embedded
    from edgeagent.store.store import open_store

    store = open_store(settings)
    if store.refs().current is not None:
        return
    interactive = sys.stderr.isatty()
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    # On a terminal the bars show progress; elsewhere a line every few seconds does.
    logging.getLogger("edgeagent.progress").setLevel(
        logging.WARNING if interactive else logging.INFO
    )
    print(
        "the store is empty: making the embedded model: training on the project's text (the "
        f"first time; cached in {settings.cache_dir}), then 4-bit GPTQ with AutoRound",
        flush=True,
    )
    started = time.perf_counter()
    manifest = build_embedded(store, settings.cache_dir)
    print(f"model {manifest.version} stored after {time.perf_counter() - started:.1f} s")


# What the daemon's log says at each phase of its start (vLLM's own lines among them).
DAEMON_PHASES = (
    ("effective configuration", "daemon started; verifying the model, importing vLLM"),
    ("Initializing a V1 LLM engine", "starting vLLM's engine processes"),
    ("Starting to load model", "loading the 4-bit weights"),
    (
        "Warming up model for the compilation",
        "compiling with torch.compile, warming up (cached for later starts)",
    ),
    ("Warming up done", "compiled; sizing the KV cache"),
    ("edgeagent.engine.loader: engine on", "smoke test passed"),
)


def _follow_phases(log_path: Path, done: threading.Event, started: float) -> None:
    """Print a line as the daemon reaches each phase of its start, until `done`."""
    reached = 0
    with log_path.open(errors="replace") as log:
        while not done.is_set() and reached < len(DAEMON_PHASES):
            line = log.readline()
            if not line:
                time.sleep(0.2)
                continue
            for index in range(reached, len(DAEMON_PHASES)):
                marker, phase = DAEMON_PHASES[index]
                if marker in line:
                    print(f"  {time.perf_counter() - started:6.1f} s  {phase}", flush=True)
                    reached = index + 1
                    break


def _info_lines(info: pb.ModelInfo) -> None:
    print(
        f"model {info.model_id} version {info.version} ({info.architecture}, "
        f"quantization {info.quantization}), context {info.max_context_tokens} tokens"
    )


def _make_tiny(args: argparse.Namespace) -> int:
    from edgeagent.demo.tiny import build_tiny_model

    print(build_tiny_model(args.out, seed=args.seed))
    return 0


def _config(args: argparse.Namespace) -> int:
    from edgeagent.settings import Settings

    print(json.dumps(Settings().redacted(), indent=2, sort_keys=True))
    return 0
