"""Commands that run or talk to the daemon: serve, generate, tokenize, detokenize, health, info,
demo, config, make-tiny."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message as Message_

from edgeagent.client import Client, Message, Parameters, build_request, describe_rpc_error
from edgeagent.errors import EdgeAgentError
from edgeagent.logs import setup_logging
from edgeagent.v1 import generation_pb2 as pb

EXIT_RPC_FAILED = 3


def add_commands(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.set_defaults(handler=_serve)

    generate = commands.add_parser(
        "generate",
        help="stream an answer to the terminal",
        description="Stream an answer: its text on stdout; token details (--logprobs, "
        "--prompt-logprobs), counts and timing on stderr. The fields are in docs/api.md.",
    )
    generate.add_argument("prompt")
    generate.add_argument("--chat", action="store_true", help="send as a user chat message")
    generate.add_argument("--system", help="a system message (implies --chat)")
    generate.add_argument("--target", help="gRPC target; default: the daemon's Unix socket")
    generate.add_argument(
        "--timeout", type=float, metavar="SECONDS",
        help="the call's deadline: the daemon ends generation just before it (finish TIME_LIMIT)",
    )  # fmt: skip
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--min-p", type=float)
    sampling.add_argument("--seed", type=int)
    sampling.add_argument("--repetition-penalty", type=float)
    sampling.add_argument("--presence-penalty", type=float)
    sampling.add_argument("--frequency-penalty", type=float)
    stopping = generate.add_argument_group("stopping")
    stopping.add_argument("--max-tokens", type=int)
    stopping.add_argument("--min-tokens", type=_count)
    stopping.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    stopping.add_argument(
        "--stop-token-id", type=_token_id, action="append", default=[], dest="stop_token_ids",
        metavar="ID", help="stop at this token id too (repeatable)",
    )  # fmt: skip
    stopping.add_argument(
        "--include-stop", action="store_true", help="keep the stop string in the text"
    )
    stopping.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    stopping.add_argument(
        "--time-limit", type=_seconds, metavar="SECONDS",
        help="the server ends generation after this long (finish TIME_LIMIT)",
    )  # fmt: skip
    request = generate.add_argument_group("request")
    request.add_argument("-n", "--n", type=_count, help="completions to generate")
    request.add_argument(
        "--priority", type=int, help="lower runs first (needs priority scheduling)"
    )
    request.add_argument(
        "--max-queue", type=_seconds, metavar="SECONDS",
        help="refuse (RESOURCE_EXHAUSTED) rather than wait longer for the first token",
    )  # fmt: skip
    request.add_argument(
        "--logprobs", type=_count, metavar="N",
        help="print each generated token's log-probability and its N most likely alternatives",
    )  # fmt: skip
    request.add_argument(
        "--prompt-logprobs", action="store_true", help="print the prompt's tokens too"
    )
    constraint = generate.add_argument_group(
        "structured output (at most one)"
    ).add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema", type=_file_text, metavar="FILE", help="a JSON Schema the output matches"
    )
    constraint.add_argument("--json-object", action="store_true", help="any JSON object")
    constraint.add_argument("--regex", help="a regular expression the whole output matches")
    constraint.add_argument(
        "--choice", action="append", default=[], help="the output is one of these (repeatable)"
    )
    constraint.add_argument(
        "--grammar", type=_file_text, metavar="FILE", help="an EBNF (GBNF) or Lark grammar"
    )
    generate.set_defaults(handler=_generate)

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

    tokenize = commands.add_parser(
        "tokenize", help="print a prompt's token ids (as generate sends them to the engine)"
    )
    tokenize.add_argument("text")
    tokenize.add_argument("--chat", action="store_true", help="as a user chat message")
    tokenize.add_argument("--system", help="a system message (implies --chat)")
    tokenize.add_argument("--tokens", action="store_true", help="one token a line, with its text")
    tokenize.add_argument("--target")
    tokenize.set_defaults(handler=_tokenize)

    detokenize = commands.add_parser("detokenize", help="print the text of token ids")
    detokenize.add_argument("ids", type=_token_id, nargs="+", metavar="ID")
    detokenize.add_argument(
        "--skip-special-tokens", action="store_true", help="leave special tokens out"
    )
    detokenize.add_argument("--target")
    detokenize.set_defaults(handler=_detokenize)

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


def generate_request(args: argparse.Namespace) -> pb.GenerateRequest:
    """The request `edgeagent generate` sends for its parsed arguments."""
    params = Parameters(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        repetition_penalty=args.repetition_penalty,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        min_tokens=args.min_tokens,
        time_limit_ms=_ms(args.time_limit),
        include_stop_sequence=args.include_stop,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
        n=args.n,
        priority=args.priority,
        max_queue_ms=_ms(args.max_queue),
        logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs,
        json_schema=args.json_schema,
        json_object=args.json_object,
        regex=args.regex,
        choice=args.choice,
        grammar=args.grammar,
    )
    messages = _messages(args, args.prompt)
    if messages is not None:
        return build_request(messages=messages, params=params)
    return build_request(prompt=args.prompt, params=params)


def _messages(args: argparse.Namespace, text: str) -> list[Message] | None:
    """With --chat or --system: the chat messages; else None (a raw prompt)."""
    if not (args.chat or args.system):
        return None
    system = [("system", args.system)] if args.system else []
    return [*system, ("user", text)]


def _generate(args: argparse.Namespace) -> int:
    request = generate_request(args)
    with Client(args.target, timeout=args.timeout) as client:
        return _print_stream(client.stream_request(request), n=request.n or 1)


@dataclass
class _Completion:
    """One completion of a stream as it arrives."""

    texts: list[str] = field(default_factory=list)
    tokens: list[pb.TokenInfo] = field(default_factory=list)
    last: pb.GenerateStreamResponse | None = None

    def add(self, message: pb.GenerateStreamResponse) -> None:
        self.texts.append(message.text)
        self.tokens.extend(message.tokens)
        self.last = message

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason not in UNFINISHED


UNFINISHED = (pb.FINISH_REASON_UNSPECIFIED, pb.FINISH_REASON_NOT_FINISHED)


class _StreamPrinter:
    """Writes completion 0 to stdout as it arrives. With n > 1 the others follow in index
    order, each under a header line; one's text is held until those before it have finished."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.completions = defaultdict[int, _Completion](_Completion)
        self.input_tokens: list[pb.TokenInfo] = []
        self.usage: pb.Usage | None = None
        self.last = pb.GenerateStreamResponse()
        self.shown = 0  # the completion written as it arrives
        self.wrote = False

    def add(self, message: pb.GenerateStreamResponse) -> None:
        if not self.wrote and self.n > 1:
            self._write(self._header(0))
        self.last = message
        self.input_tokens.extend(message.input_tokens)
        if message.HasField("usage"):
            self.usage = message.usage
        self.completions[message.index].add(message)
        if message.index == self.shown:
            self._write(message.text)
        while self.shown + 1 < self.n and self.completions[self.shown].finished:
            self.shown += 1
            self._write("\n" + self._header(self.shown))
            self._write("".join(self.completions[self.shown].texts))
        sys.stdout.flush()

    def _write(self, text: str) -> None:
        sys.stdout.write(text)
        self.wrote = True

    @staticmethod
    def _header(index: int) -> str:
        return f"=== completion {index} ===\n"

    def details(self) -> Iterator[str]:
        """Lines of token details (on stderr), if any were asked for."""
        if self.input_tokens:
            yield from _token_table("prompt tokens", self.input_tokens)
        for index, completion in sorted(self.completions.items()):
            if completion.tokens:
                title = f"tokens of completion {index}" if self.n > 1 else "tokens"
                yield from _token_table(title, completion.tokens)

    def summary(self, elapsed: float, first: float | None) -> Iterator[str]:
        """The counts and timing (on stderr)."""
        last = self.last
        ends = [
            (index, c.last) for index, c in sorted(self.completions.items()) if c.last is not None
        ]
        generated = sum(end.completion_tokens for _, end in ends)
        decode = elapsed - (first or 0.0)
        counted = len(ends)
        rate = (generated - counted) / decode if decode > 0 and generated > counted else 0
        timing = f"in {elapsed:.2f} s; first token {1000 * (first or 0):.0f} ms; {rate:.0f} tok/s"
        if self.n == 1:
            yield (
                f"--- {last.prompt_tokens} prompt tokens, {last.completion_tokens} generated "
                f"{timing}; finish: {pb.FinishReason.Name(last.finish_reason)}"
            )
        else:
            finishes = ", ".join(
                f"{index}: {end.completion_tokens} {pb.FinishReason.Name(end.finish_reason)}"
                for index, end in ends
            )
            yield (
                f"--- {last.prompt_tokens} prompt tokens, {counted} completions, {generated} "
                f"tokens generated {timing}; finish: {finishes}"
            )
        if self.usage is not None:
            usage = self.usage
            yield (
                f"--- server: {usage.cached_prompt_tokens} cached prompt tokens; first token "
                f"{usage.time_to_first_token_ms:.0f} ms; total {usage.total_time_ms:.0f} ms"
            )


def _token_table(title: str, tokens: list[pb.TokenInfo]) -> Iterator[str]:
    yield f"--- {title}: id, text, logprob, rank | most likely alternatives"
    for info in tokens:
        logprob = f"{info.logprob:9.4f}" if info.HasField("logprob") else " " * 9
        rank = f"#{info.rank}" if info.HasField("rank") else ""
        line = f"{info.id:>8}  {info.text!r:<16} {logprob} {rank:>4}"
        alternatives = ", ".join(f"{top.text!r} {top.logprob:.4f}" for top in info.top_tokens)
        yield f"{line} | {alternatives}" if alternatives else line.rstrip()


def _print_stream(responses: Iterator[pb.GenerateStreamResponse], n: int = 1) -> int:
    """Print text as it arrives (n > 1: each completion under its header), then token details
    if asked for, and a line of counts and timing, on stderr."""
    started = time.perf_counter()
    first: float | None = None
    printer = _StreamPrinter(n)
    try:
        for message in responses:
            if first is None:
                first = time.perf_counter() - started
            printer.add(message)
    except grpc.RpcError as error:
        newline = "\n" if first is not None else ""
        print(f"{newline}error: {describe_rpc_error(error)}", file=sys.stderr)
        return EXIT_RPC_FAILED
    elapsed = time.perf_counter() - started
    print(file=sys.stderr)
    for line in [*printer.details(), *printer.summary(elapsed, first)]:
        print(line, file=sys.stderr)
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


def _tokenize(args: argparse.Namespace) -> int:
    messages = _messages(args, args.text)
    with Client(args.target) as client:
        if messages is not None:
            reply = client.tokenize(messages=messages, return_tokens=args.tokens)
        else:
            reply = client.tokenize(prompt=args.text, return_tokens=args.tokens)
    if args.tokens:
        for token_id, text in zip(reply.token_ids, reply.tokens, strict=True):
            print(f"{token_id:>8}  {text!r}")
    else:
        print(" ".join(str(token_id) for token_id in reply.token_ids))
    print(f"--- {reply.token_count} tokens (version {reply.model_version})", file=sys.stderr)
    return 0


def _detokenize(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        reply = client.detokenize(args.ids, skip_special_tokens=args.skip_special_tokens)
    print(reply.text)
    return 0


def _token_id(text: str) -> int:
    """A token id argument: a non-negative integer."""
    return _non_negative(text, "a token id")


def _count(text: str) -> int:
    return _non_negative(text, "a count")


def _non_negative(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not {what} (negative): {text}")
    return value


def _seconds(text: str) -> float:
    """A duration argument in seconds: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0: {text}")
    return value


def _ms(seconds: float | None) -> int | None:
    """Seconds as whole milliseconds (at least 1 for any time at all); None stays None."""
    if seconds is None:
        return None
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


def _file_text(path: str) -> str:
    """The text of the file an argument names."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}") from None


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
