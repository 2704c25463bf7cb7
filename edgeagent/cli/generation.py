"""Commands that send text to the daemon: generate, tokenize, detokenize."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from edgeagent.cli.streams import print_stream
from edgeagent.client import Client, Message, Parameters, build_request
from edgeagent.v1 import generation_pb2 as pb


def add_commands(commands: Any) -> None:
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
        return print_stream(client.stream_request(request), n=request.n or 1)


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
