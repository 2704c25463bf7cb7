"""Constrained (JSON schema) vs free decoding, the daemon over gRPC vs vLLM's `AsyncLLM` called
directly: same model, same engine arguments, same run, interleaved.

Prints a Markdown table of completion tokens, decode tokens/s per stream, aggregate tokens/s and
time to first token for each mode, side and stream count, with the daemon/raw ratios; then the
constrained/free ratios of each side.

    .venv/bin/python bench/bench_constrained.py [--model DIR | --state DIR] [--rounds 5]
        [--streams 1 8] [--kv-cache-gib 0.5] [--max-num-seqs 16] [--max-model-len N]
        [--max-tokens 128] [--schema JSON] [--raw-constraint json|daemon]

Free requests set ignore_eos, so each makes exactly --max-tokens tokens. A constrained request
ends where its grammar does (the grammar then allows only end-of-sequence), so its length
varies: decode tokens/s is (tokens - 1) / (time after the first token), and the table gives the
tokens counted, how many requests ended at --max-tokens, and how many outputs parse as JSON.
Constrained requests cannot set ignore_eos: vLLM would go on past the grammar's end without a
constraint (the daemon refuses the combination).

The raw side sends the schema as vLLM's `StructuredOutputsParams(json=...)`, as an app calling
vLLM would. The daemon sends it compiled into xgrammar EBNF with whitespace runs bounded
(edgeagent/engine/structured.py); --raw-constraint daemon gives the raw side that same grammar,
so the two sides decode the same tokens and the ratio is the daemon's own overhead.

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from bench_serving import (
    Sample,
    prepare_store,
    serving_parser,
    sizes_of,
    start_daemon,
    start_raw,
)

from edgeagent.engine.interface import Constraint, EngineConfig
from edgeagent.engine.structured import structured_outputs
from edgeagent.settings import ModelSettings
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

PROMPT = "Describe one person as a JSON object with a name, an age and a few tags:"
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
)
MODES = ("free", "json")
SIDES = ("raw", "daemon")
TEMPERATURE = 0.8  # as bench_serving.py


@dataclass
class Output(Sample):
    capped: bool = False  # ended at max_tokens
    text: str = ""

    @property
    def valid_json(self) -> bool:
        return json_error(self.text) is None


def json_error(text: str) -> str | None:
    try:
        json.loads(text)
    except ValueError as error:
        return str(error)
    return None


@dataclass
class Trial:
    outputs: list[Output]
    wall_s: float

    @property
    def aggregate_tok_s(self) -> float:
        return sum(o.tokens for o in self.outputs) / self.wall_s


RunOne = Callable[[int], Awaitable[Output]]  # seed -> one stream's output


async def raw_stream(
    llm: AsyncLLM,
    max_tokens: int,
    seed: int,
    ignore_eos: bool,
    structured: dict[str, Any] | None,
) -> Output:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=TEMPERATURE,
        seed=seed,
        ignore_eos=ignore_eos,
        structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        output_kind=RequestOutputKind.DELTA,
    )
    started = time.perf_counter()
    first, tokens, text, finish = 0.0, 0, "", None
    async for output in llm.generate({"prompt": PROMPT}, params, uuid.uuid4().hex):
        completion = output.outputs[0]
        if tokens == 0:
            first = time.perf_counter() - started
        tokens += len(completion.token_ids)
        text += completion.text
        finish = completion.finish_reason
    return Output(first, tokens, time.perf_counter() - started, finish == "length", text)


async def daemon_stream(
    stub: pb_grpc.GenerationServiceStub,
    max_tokens: int,
    seed: int,
    ignore_eos: bool,
    schema: str | None,
) -> Output:
    request = pb.GenerateRequest(
        prompt=PROMPT,
        sampling=pb.SamplingParameters(temperature=TEMPERATURE, seed=seed),
        stopping=pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=ignore_eos),
    )
    if schema is not None:
        request.constraint.json_schema = schema
    started = time.perf_counter()
    first, tokens, text, finish = 0.0, 0, "", pb.FINISH_REASON_UNSPECIFIED
    async for message in stub.GenerateStream(request):
        if tokens == 0:
            first = time.perf_counter() - started
        tokens = message.completion_tokens
        text += message.text
        finish = message.finish_reason
    capped = finish == pb.FINISH_REASON_MAX_TOKENS
    return Output(first, tokens, time.perf_counter() - started, capped, text)


async def trial(run_one: RunOne, streams: int, round_: int) -> Trial:
    started = time.perf_counter()
    outputs = await asyncio.gather(*(run_one(1000 * round_ + i) for i in range(streams)))
    return Trial(list(outputs), time.perf_counter() - started)


def raw_structured(form: str, schema: str, config: EngineConfig) -> dict[str, Any]:
    """`StructuredOutputsParams`' fields for the raw side: the schema as is, or what the
    daemon's engine makes of it."""
    if form == "json":
        return {"json": schema}
    params = structured_outputs(Constraint(json_schema=schema), config)
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


Key = tuple[str, str, int]  # mode, side, streams


def median(trials: list[Trial], key: str) -> float:
    return float(statistics.median(getattr(o, key) for t in trials for o in t.outputs))


def aggregate(trials: list[Trial]) -> float:
    return statistics.median(t.aggregate_tok_s for t in trials)


def counted(trials: list[Trial]) -> str:
    tokens = [o.tokens for t in trials for o in t.outputs]
    low, high = min(tokens), max(tokens)
    spread = f" ({low}-{high})" if low != high else ""
    return f"{statistics.median(tokens):.0f}{spread}"


def endings(trials: list[Trial], mode: str) -> str:
    outputs = [o for t in trials for o in t.outputs]
    capped = f"{sum(o.capped for o in outputs)}/{len(outputs)} capped"
    if mode == "free":
        return capped
    return f"{capped}, {sum(o.valid_json for o in outputs)}/{len(outputs)} JSON"


def side_by_side(mode: str, streams: int, raw: list[Trial], daemon: list[Trial]) -> str:
    r_dec, d_dec = median(raw, "decode_tok_s"), median(daemon, "decode_tok_s")
    r_agg, d_agg = aggregate(raw), aggregate(daemon)
    r_ttft, d_ttft = median(raw, "ttft_s") * 1000, median(daemon, "ttft_s") * 1000
    return (
        f"| {mode} | {streams} | {counted(raw)} | {counted(daemon)} | {r_dec:.0f} | {d_dec:.0f} | "
        f"{d_dec / r_dec:.3f} | {r_agg:.0f} | {d_agg:.0f} | **{d_agg / r_agg:.3f}** | "
        f"{r_ttft:.1f} | {d_ttft:.1f} | {d_ttft - r_ttft:+.1f} | {endings(raw, mode)} | "
        f"{endings(daemon, mode)} |"
    )


def cost(streams: int, results: dict[Key, list[Trial]]) -> str:
    decode, aggregates, ttft = [], [], []
    for side in SIDES:
        free, constrained = results["free", side, streams], results["json", side, streams]
        decode.append(median(constrained, "decode_tok_s") / median(free, "decode_tok_s"))
        aggregates.append(aggregate(constrained) / aggregate(free))
        ttft.append((median(constrained, "ttft_s") - median(free, "ttft_s")) * 1000)
    cells = [f"{r:.3f}" for r in decode + aggregates] + [f"{d:+.1f}" for d in ttft]
    return f"| {streams} | " + " | ".join(cells) + " |"


async def main() -> None:
    defaults = ModelSettings.model_fields
    parser = serving_parser(streams=8, max_num_seqs=16)
    parser.add_argument("--schema", default=SCHEMA, help="JSON schema text")
    parser.add_argument(
        "--raw-constraint",
        choices=["json", "daemon"],
        default="json",
        help="raw side: the schema as vLLM's json= (default), or the daemon's grammar for it",
    )
    parser.add_argument(
        "--structured-output-backend",
        choices=["auto", "xgrammar", "guidance"],
        default=defaults["structured_output_backend"].default,
    )
    parser.add_argument(
        "--json-max-whitespace", type=int, default=defaults["json_max_whitespace"].default
    )
    args = parser.parse_args()
    sizes = sizes_of(args)
    schema = json.dumps(json.loads(args.schema))  # fails early on a typo
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-bench-"))
    state_dir = args.state or workdir / "state"
    model = prepare_store(state_dir, args.model, reuse=args.state is not None)
    backend = args.structured_output_backend
    config = EngineConfig(
        model_path=model,
        kv_cache_bytes=int(sizes.kv_cache_gib * (1 << 30)),
        max_num_seqs=sizes.max_num_seqs,
        structured_output_backend=backend,
        json_max_whitespace=args.json_max_whitespace,
    )
    structured = raw_structured(args.raw_constraint, schema, config)
    extra_env = {
        "EDGEAGENT_MODEL__STRUCTURED_OUTPUT_BACKEND": backend,
        "EDGEAGENT_MODEL__JSON_MAX_WHITESPACE": str(args.json_max_whitespace),
    }
    daemon, target = start_daemon(workdir, state_dir, args.cache, sizes, extra_env)
    results: dict[Key, list[Trial]] = {
        (mode, side, n): [] for mode in MODES for side in SIDES for n in args.streams
    }
    llm: AsyncLLM | None = None
    try:
        llm = engine = start_raw(model, sizes, backend)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
            m = args.max_tokens
            runners: dict[tuple[str, str], RunOne] = {
                ("free", "raw"): lambda s: raw_stream(engine, m, s, True, None),
                ("free", "daemon"): lambda s: daemon_stream(stub, m, s, True, None),
                ("json", "raw"): lambda s: raw_stream(engine, m, s, False, structured),
                ("json", "daemon"): lambda s: daemon_stream(stub, m, s, False, schema),
            }
            for warm in runners.values():  # compiles, caches the grammar, fills the graphs
                await trial(warm, max(args.streams), 0)
            for round_ in range(1, args.rounds + 1):
                for streams in args.streams:
                    order = [(mode, side) for mode in MODES for side in SIDES]
                    if round_ % 2 == 0:  # alternate who goes first
                        order.reverse()
                    for mode, side in order:
                        result = await trial(runners[mode, side], streams, round_)
                        results[mode, side, streams].append(result)
    finally:
        if llm is not None:
            llm.shutdown()
        daemon.terminate()
        daemon.wait(timeout=60)
    print(
        f"\n{args.rounds} interleaved rounds, at most {args.max_tokens} tokens per stream "
        "(free: ignore_eos; json: ends with its grammar), "
        f"raw constraint {args.raw_constraint}, backend {backend}, json_max_whitespace "
        f"{args.json_max_whitespace}, {sizes}, model {model}\nschema {schema}"
    )
    print(
        "| mode | streams | raw tokens/stream | daemon | raw decode tok/s/stream | daemon | "
        "ratio | raw aggregate tok/s | daemon | ratio | raw TTFT ms | daemon TTFT ms | "
        "overhead ms | raw ended | daemon ended |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        for n in args.streams:
            print(side_by_side(mode, n, results[mode, "raw", n], results[mode, "daemon", n]))
    print("\nConstrained / free, each side (TTFT: constrained minus free):")
    print(
        "| streams | raw decode ratio | daemon decode ratio | raw aggregate ratio | "
        "daemon aggregate ratio | raw TTFT +ms | daemon TTFT +ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.streams:
        print(cost(n, results))
    print("\nA constrained output from each side (last round, first stream), and the first")
    print("that json.loads refuses, if any:")
    for side in SIDES:
        last = results["json", side, args.streams[0]][-1].outputs[0]
        constrained = (o for n in args.streams for t in results["json", side, n] for o in t.outputs)
        bad = next((o for o in constrained if not o.valid_json), None)
        for output in [last] if bad is None or bad is last else [last, bad]:
            error = json_error(output.text)
            verdict = f", not JSON: {error}" if error else ""
            print(f"- {side} ({output.tokens} tokens{verdict}): {output.text[:300]!r}")


if __name__ == "__main__":
    asyncio.run(main())
