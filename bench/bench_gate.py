"""What the quality gate adds to an update: scoring the held-out eval set on a running engine
and comparing it with the serving version's scores, timed (the gate's work inside the pause).

    python bench/bench_gate.py MODEL_DIR [--eager] [--rounds 3]

Starts the daemon's engine wrapper on MODEL_DIR, scores the eval set once as the reference
(done before the pause in an update), then times `rounds` candidate scorings and comparisons.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from edgeagent.engine.interface import EngineConfig
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.eval_set import held_out_set
from edgeagent.evaluation import compare, perplexity, score_engine


async def measure(engine: VllmEngine, rounds: int) -> list[float]:
    eval_set = held_out_set()
    reference = await score_engine(engine, eval_set)
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        scores = await score_engine(engine, eval_set)
        comparison = compare(reference, scores)
        seconds.append(time.perf_counter() - started)
        print(f"round {len(seconds)}: {seconds[-1]:.3f} s", flush=True)  # before a slow shutdown
    tokens = sum(len(prompt) for prompt in reference)
    print(f"{eval_set.name}: {tokens} scored tokens, perplexity {perplexity(reference):.3f}, "
          f"agreement with itself {comparison.agreement:.3f}")  # fmt: skip
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--eager", action="store_true", help="no torch.compile (a faster start)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()
    config = EngineConfig(args.model, kv_cache_bytes=int(1.5 * (1 << 30)), max_num_seqs=32,
                          max_model_len=4096, enforce_eager=args.eager,
                          gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    started = time.perf_counter()
    engine = VllmEngine.start(config)
    print(f"engine up in {time.perf_counter() - started:.1f} s (eager: {args.eager})")
    try:
        seconds = asyncio.run(measure(engine, args.rounds))
    finally:
        engine.shutdown()
    print(f"gate (score the candidate + compare): median {statistics.median(seconds):.3f} s, "
          f"all {[round(s, 3) for s in seconds]}")  # fmt: skip


if __name__ == "__main__":
    main()
