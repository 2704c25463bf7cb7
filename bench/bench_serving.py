"""The daemon over gRPC vs vLLM's `AsyncLLM` called directly: same model, same run, interleaved.

Prints a Markdown table of decode tokens/s per stream, aggregate tokens/s, time to first token,
and the daemon/raw ratios, at 1 and 8 concurrent streams (more with --streams).

    .venv/bin/python bench/bench_serving.py [--model DIR | --state DIR] [--rounds 5] [--streams 1 8]
        [--kv-cache-gib 0.5] [--max-num-seqs 16] [--max-model-len N] [--prompt-tokens N]

Both engines get the same sizes. With --prompt-tokens N each request's prompt is N tokens long
and starts with its own seed, so vLLM's prefix cache cannot serve it (time to first token then
measures a real prefill).

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the launcher the tests share
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # as the engine wrapper does

from launcher import launch  # noqa: E402

from edgeagent.client import Parameters, build_request  # noqa: E402
from edgeagent.demo.tiny import EMBEDDED_MODEL_ID, build_tiny_model  # noqa: E402
from edgeagent.sources.build import EMBEDDED_RECIPE, BuildRequest, build  # noqa: E402
from edgeagent.store.manifest import ImportSource  # noqa: E402
from edgeagent.store.store import ModelStore  # noqa: E402
from edgeagent.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

PROMPT = "The river runs through the old town under seven stone bridges. Tell me more:"


@dataclass(frozen=True)
class Sizes:
    kv_cache_gib: float
    max_num_seqs: int
    max_model_len: int | None
    max_num_batched_tokens: int
    gpu_memory_utilization: float | None = None


class Prompts:
    """The short prompt, or a long one made unique by its seed."""

    def __init__(self, model: Path, tokens: int) -> None:
        self.tokens = tokens
        if tokens:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(model)
            filler = (PROMPT + " ") * (tokens // 4 + 8)
            self._ids = self._tokenizer(filler, add_special_tokens=False)["input_ids"]

    def __call__(self, seed: int) -> str:
        if not self.tokens:
            return PROMPT
        head = f"{seed}: "
        room = self.tokens - len(self._tokenizer(head, add_special_tokens=False)["input_ids"])
        return head + str(self._tokenizer.decode(self._ids[:room]))


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    total_s: float

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / (self.total_s - self.ttft_s) if self.tokens > 1 else 0.0


@dataclass
class Trial:
    samples: list[Sample]
    wall_s: float

    @property
    def aggregate_tok_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s


async def raw_stream(llm: AsyncLLM, prompt: str, max_tokens: int, seed: int) -> Sample:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.8, seed=seed, output_kind=RequestOutputKind.DELTA
    )
    started = time.perf_counter()
    first, tokens = 0.0, 0
    async for output in llm.generate({"prompt": prompt}, params, uuid.uuid4().hex):
        if tokens == 0:
            first = time.perf_counter() - started
        tokens += len(output.outputs[0].token_ids)
    return Sample(first, tokens, time.perf_counter() - started)


async def daemon_stream(
    stub: pb_grpc.GenerationServiceStub, prompt: str, max_tokens: int, seed: int
) -> Sample:
    request = build_request(
        prompt, params=Parameters(max_tokens=max_tokens, temperature=0.8, seed=seed)
    )
    started = time.perf_counter()
    first, tokens = 0.0, 0
    async for message in stub.GenerateStream(request):
        if tokens == 0:
            first = time.perf_counter() - started
        tokens = message.completion_tokens
    return Sample(first, tokens, time.perf_counter() - started)


RunOne = Callable[[int, int], Awaitable[Sample]]  # (max_tokens, seed) -> one stream's sample


async def trial(run_one: RunOne, streams: int, max_tokens: int, round_: int) -> Trial:
    started = time.perf_counter()
    samples = await asyncio.gather(
        *(run_one(max_tokens, 1000 * round_ + i) for i in range(streams))
    )
    return Trial(list(samples), time.perf_counter() - started)


def prepare_store(state_dir: Path, model: Path | None, reuse: bool) -> Path:
    """The daemon's store with the model as current (default: the random-weight tiny model
    built like the embedded default, whose answers run to max_tokens as the sizes ask)."""
    store = ModelStore(state_dir / "models")
    if reuse:
        return store.model_dir("current")
    if model is None:
        base = state_dir / "tiny-random-fp16"
        if not base.exists():
            build_tiny_model(base)
        request = BuildRequest(base=base, recipe=EMBEDDED_RECIPE, label=EMBEDDED_MODEL_ID)
        manifest = build(store, request)
    else:
        manifest = store.import_directory(model, ImportSource(origin=str(model)))
    store.activate(manifest.version)
    return store.model_dir(manifest.version)


def start_daemon(
    workdir: Path,
    state_dir: Path,
    cache_dir: Path,
    sizes: Sizes,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    settings = {
        "EDGEAGENT_MODEL__KV_CACHE_GIB": str(sizes.kv_cache_gib),
        "EDGEAGENT_MODEL__MAX_NUM_SEQS": str(sizes.max_num_seqs),
        "EDGEAGENT_MODEL__MAX_NUM_BATCHED_TOKENS": str(sizes.max_num_batched_tokens),
        "EDGEAGENT_LOG_LEVEL": "WARNING",
    }
    if sizes.max_model_len is not None:
        settings["EDGEAGENT_MODEL__MAX_MODEL_LEN"] = str(sizes.max_model_len)
    settings.update(extra_env or {})
    daemon = launch(workdir, state_dir, cache_dir, settings)
    daemon.wait_until_serving(timeout_s=600)
    return daemon.process, daemon.target


def start_raw(model: Path, sizes: Sizes, structured_output_backend: str = "auto") -> AsyncLLM:
    """vLLM's engine with the daemon's arguments (edgeagent/engine/vllm_engine.py `_engine_args`):
    dtype, enforce_eager and scheduling_policy left at vLLM's defaults, which are the daemon's
    too, and no worker extension (its methods serve weight reloads only)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model),
        kv_cache_memory_bytes=int(sizes.kv_cache_gib * (1 << 30)),
        max_num_seqs=sizes.max_num_seqs,
        max_num_batched_tokens=sizes.max_num_batched_tokens,
        disable_log_stats=True,
        structured_outputs_config=StructuredOutputsConfig(
            backend=structured_output_backend  # type: ignore[arg-type]  # a Literal in vLLM
        ),
    )
    if sizes.max_model_len is not None:
        args.max_model_len = sizes.max_model_len
    if sizes.gpu_memory_utilization is not None:
        args.gpu_memory_utilization = sizes.gpu_memory_utilization
    return AsyncLLM.from_engine_args(args)


def row(label: str, raw: list[Trial], daemon: list[Trial]) -> str:
    def per_stream(trials: list[Trial], key: str) -> float:
        return statistics.median(getattr(s, key) for t in trials for s in t.samples)

    def aggregate(trials: list[Trial]) -> float:
        return statistics.median(t.aggregate_tok_s for t in trials)

    r_dec, d_dec = per_stream(raw, "decode_tok_s"), per_stream(daemon, "decode_tok_s")
    r_agg, d_agg = aggregate(raw), aggregate(daemon)
    r_ttft, d_ttft = per_stream(raw, "ttft_s") * 1000, per_stream(daemon, "ttft_s") * 1000
    return (
        f"| {label} | {r_dec:.0f} | {d_dec:.0f} | {d_dec / r_dec:.3f} | {r_agg:.0f} | "
        f"{d_agg:.0f} | **{d_agg / r_agg:.3f}** | {r_ttft:.1f} | {d_ttft:.1f} | "
        f"{d_ttft - r_ttft:+.1f} |"
    )


def round_ratios(raw: list[Trial], daemon: list[Trial]) -> str:
    """Each round's daemon/raw aggregate, the two measured back to back: their median and
    quartiles, then every one (the run's noise)."""
    ratios = sorted(d.aggregate_tok_s / r.aggregate_tok_s for r, d in zip(raw, daemon, strict=True))
    summary = ""
    if len(ratios) >= 4:
        low, median, high = statistics.quantiles(ratios, n=4)
        summary = f"median {median:.3f}, quartiles {low:.3f} to {high:.3f}; "
    return summary + " ".join(f"{ratio:.3f}" for ratio in ratios)


class CpuPerToken:
    """CPU seconds that processes spend per token served, summed over trials: the serving path's
    own cost, which the box's noise (decode speed varies by ±15 % between rounds on a shared
    2-core machine) hides in the tokens/s ratios. A process's engine core is a child of its
    own and not counted."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        import psutil  # a dependency of vLLM's

        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._seconds = dict.fromkeys(pids, 0.0)
        self.tokens = 0

    def _now(self) -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in self._processes.items()}

    async def measure(self, run: Awaitable[Trial]) -> Trial:
        before = self._now()
        result = await run
        for name, seconds in self._now().items():
            self._seconds[name] += seconds - before[name]
        self.tokens += sum(sample.tokens for sample in result.samples)
        return result

    def line(self) -> str:
        return ", ".join(
            f"{name} {1e6 * seconds / max(self.tokens, 1):.0f} µs"
            for name, seconds in self._seconds.items()
        )


def serving_parser(streams: int, max_num_seqs: int) -> argparse.ArgumentParser:
    """The options the serving benchmarks share: what to serve, how long, how engines are sized
    (both sides get the same sizes); `streams` is the larger default concurrency."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="default: the embedded tiny model")
    parser.add_argument("--state", type=Path, help="serve this state dir's current version")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache", help="EDGEAGENT_CACHE_DIR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, streams])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, help="raw engine, GPU only")
    return parser


def sizes_of(args: argparse.Namespace) -> Sizes:
    return Sizes(
        args.kv_cache_gib,
        args.max_num_seqs,
        args.max_model_len,
        args.max_num_batched_tokens,
        args.gpu_memory_utilization,
    )


async def main() -> None:
    parser = serving_parser(streams=8, max_num_seqs=16)
    parser.add_argument("--prompt-tokens", type=int, default=0)
    args = parser.parse_args()
    sizes = sizes_of(args)
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-bench-"))
    state_dir = args.state or workdir / "state"
    model = prepare_store(state_dir, args.model, reuse=args.state is not None)
    prompts = Prompts(model, args.prompt_tokens)
    daemon, target = start_daemon(workdir, state_dir, args.cache, sizes)
    results: dict[int, tuple[list[Trial], list[Trial]]] = {n: ([], []) for n in args.streams}
    llm = None
    try:
        llm = start_raw(model, sizes)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            runners = (
                lambda m, s: raw_stream(llm, prompts(s), m, s),
                lambda m, s: daemon_stream(stub, prompts(s), m, s),
            )
            for warm in runners:
                await trial(warm, max(args.streams), args.max_tokens, 0)
            raw_pids = {"benchmark process (vLLM's front end)": os.getpid()}
            daemon_pids = {"daemon": daemon.pid, "benchmark process (gRPC client)": os.getpid()}
            cpu = (
                {streams: CpuPerToken(raw_pids) for streams in args.streams},
                {streams: CpuPerToken(daemon_pids) for streams in args.streams},
            )
            for round_ in range(1, args.rounds + 1):
                for streams in args.streams:
                    order = (0, 1) if round_ % 2 else (1, 0)  # alternate who goes first
                    for side in order:
                        run = trial(runners[side], streams, args.max_tokens, round_)
                        result = await cpu[side][streams].measure(run)
                        results[streams][side].append(result)
    finally:
        if llm is not None:
            llm.shutdown()
            del llm  # now, not in __del__ at exit, when vLLM's module globals are gone
        daemon.terminate()
        daemon.wait(timeout=60)
    print(
        f"\n{args.rounds} interleaved rounds, {args.max_tokens} tokens per stream, "
        f"{args.prompt_tokens or 'short'} prompt tokens, {sizes}, model {model}"
    )
    print(
        "| streams | raw decode tok/s/stream | daemon | ratio | raw aggregate tok/s | daemon | "
        "ratio | raw TTFT ms | daemon TTFT ms | overhead ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for streams, (raw, over_grpc) in results.items():
        print(row(str(streams), raw, over_grpc))
    for streams, (raw, over_grpc) in results.items():
        print(f"{streams} streams, daemon/raw aggregate by round: {round_ratios(raw, over_grpc)}")
    for streams in args.streams:
        print(f"{streams} streams, CPU per token: raw: {cpu[0][streams].line()}; "
              f"daemon side: {cpu[1][streams].line()}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
