"""Raw vLLM's decode speed under engine options, on one model: the table behind the daemon's
engine defaults (issue 17). Each option set runs in its own process (kernel choices are read
from the environment at import), with the sizes the other GPU benchmarks use.

    python bench/bench_options.py MODEL_DIR CACHE_DIR [--options defaults marlin ...]
        [--rounds 3] [--max-tokens 256] [--streams 1 32]

Prints one Markdown row per option set: decode tok/s of one stream, aggregate tok/s at the
larger count, TTFT, the KV cache's token capacity, and each speed as a ratio to the first set
(vLLM's defaults). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MARLIN = {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}
# Neither Machete nor Marlin: vLLM falls through its GPTQ kernel list to ExLlama's.
EXLLAMA = {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel,MarlinLinearKernel,AllSparkLinearKernel,"
           "ConchLinearKernel"}  # fmt: skip
OPTIONS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "defaults": ({}, {}),
    "marlin": (MARLIN, {}),
    "marlin+fp8kv": (MARLIN, {"kv_cache_dtype": "fp8"}),
    "marlin+async": (MARLIN, {"async_scheduling": True}),
    "marlin+fp8kv+async": (MARLIN, {"kv_cache_dtype": "fp8", "async_scheduling": True}),
    "defaults+fp8kv": ({}, {"kv_cache_dtype": "fp8"}),
    "exllama": (EXLLAMA, {}),
    "marlin+graphs-to-32": (MARLIN, {"compilation_config": {"max_cudagraph_capture_size": 32}}),
}


def child(model: str, name: str, rounds: int, max_tokens: int, streams: list[int]) -> None:
    from bench_serving import PROMPT, Trial, raw_stream, trial
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    extra = OPTIONS[name][1]
    args = AsyncEngineArgs(
        model=model, kv_cache_memory_bytes=int(1.5 * (1 << 30)), max_num_seqs=32,
        max_model_len=4096, gpu_memory_utilization=0.3, disable_log_stats=True, **extra,
    )  # fmt: skip

    async def measure() -> dict[str, Any]:
        llm = AsyncLLM.from_engine_args(args)
        try:
            config = llm.vllm_config.cache_config
            results: dict[int, list[Trial]] = {n: [] for n in streams}

            async def run(m: int, s: int) -> Any:
                return await raw_stream(llm, PROMPT, m, s)

            await trial(run, max(streams), max_tokens, 0)  # warm-up
            for round_ in range(1, rounds + 1):
                for n in streams:
                    results[n].append(await trial(run, n, max_tokens, round_))
            return {
                "kv_tokens": int(config.num_gpu_blocks or 0) * int(config.block_size),
                **{
                    f"{n}": {
                        "decode": statistics.median(
                            s.decode_tok_s for t in trials for s in t.samples
                        ),
                        "aggregate": statistics.median(t.aggregate_tok_s for t in trials),
                        "ttft_ms": 1000
                        * statistics.median(s.ttft_s for t in trials for s in t.samples),
                    }
                    for n, trials in results.items()
                },
            }
        finally:
            llm.shutdown()

    print("RESULT " + json.dumps(asyncio.run(measure())), flush=True)


def main() -> None:
    if sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
              json.loads(sys.argv[6]))  # fmt: skip
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("cache_dir")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--streams", type=int, nargs=2, default=[1, 32])
    args = parser.parse_args()
    rows, base = [], None
    for name in args.options:
        env = {**os.environ, **OPTIONS[name][0], "VLLM_CACHE_ROOT": str(Path(args.cache_dir))}
        done = subprocess.run(
            [sys.executable, __file__, "child", args.model, name, str(args.rounds),
             str(args.max_tokens), json.dumps(args.streams)],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out := os.environ.get("OUT"):
            log = Path(out) / f"options-{name.replace('+', '_')}.log"  # '+' does not come back
            log.write_text(done.stdout + done.stderr)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            rows.append(f"| {name} | failed: {done.stderr.strip().splitlines()[-1:]} |")
            print(rows[-1], flush=True)
            continue
        result = json.loads(line.removeprefix("RESULT "))
        one, many = result[str(args.streams[0])], result[str(args.streams[1])]
        base = base or (one["decode"], many["aggregate"])
        rows.append(
            f"| {name} | {one['decode']:.0f} | {one['decode'] / base[0]:.3f} | "
            f"{many['aggregate']:.0f} | {many['aggregate'] / base[1]:.3f} | "
            f"{one['ttft_ms']:.1f} | {many['ttft_ms']:.1f} | {result['kv_tokens']} |"
        )
        print(rows[-1], flush=True)
    print(f"\n| options | decode tok/s, {args.streams[0]} stream | vs defaults | aggregate tok/s, "
          f"{args.streams[1]} streams | vs defaults | TTFT ms, 1 | TTFT ms, {args.streams[1]} | "
          "KV cache tokens in 1.5 GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
