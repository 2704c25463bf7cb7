"""Printing a generation stream: the text as it arrives on stdout (n > 1: each completion under
its header), then token details, counts and timing on stderr."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from edgeagent.client import describe_rpc_error
from edgeagent.v1 import generation_pb2 as pb

EXIT_RPC_FAILED = 3


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


def print_stream(responses: Iterator[pb.GenerateStreamResponse], n: int = 1) -> int:
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
