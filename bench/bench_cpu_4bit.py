"""4-bit decode on a CPU: edgeagent's kernel (the AVX2 path) against the fp16 model and, where
the CPU build has one, vLLM's own 4-bit kernel; each on its own engine, in one run, as ratios.

    .venv/bin/python bench/bench_cpu_4bit.py FP16_DIR GPTQ_DIR [--rounds 3]

FP16_DIR is the trained embedded model (`.cache/trained/tiny-phi4-*`), GPTQ_DIR its 4-bit build
(a store version's `model/` directory). Each variant's first answer is printed too: a speed is
worth nothing if the answer is noise. (An `--avx2` flag capped the engines at AVX2 as the
training child is, with ATEN_CPU_CAPABILITY=avx2: on an AVX-512 machine vLLM's CPU engine then
answers "!!!!" with NaN logits, fp16 and 4-bit alike, so it is gone with the figures it gave.)
Each variant: single-stream greedy decode of `--tokens` tokens, the best of
`--rounds`, after one warm-up; the three engines run side by side and take turns round by round.
Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from edgeagent.demo.dataset import Exchange
from edgeagent.engine.interface import EngineConfig, SamplingOptions
from edgeagent.engine.vllm_engine import VllmEngine

PROMPT = Exchange("Tell me about edgeagent.", "").prompt()


async def decode_speed(engine: VllmEngine, tokens: int, name: str) -> tuple[float, str]:
    """Tokens a second, and the answer's text."""
    options = SamplingOptions(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    started, generated, text = time.perf_counter(), 0, ""
    async for delta in engine.stream(engine.encode(PROMPT), options, name):
        generated, text = delta.completion_tokens, text + delta.text
    return generated / (time.perf_counter() - started), text


def start(model: Path, kernel: str) -> VllmEngine:
    config = EngineConfig(model_path=model, kv_cache_bytes=128 << 20, max_num_seqs=4,
                          max_model_len=1024, cpu_quantized_kernel=kernel)  # fmt: skip
    return VllmEngine.start(config)


async def interleaved(engines: dict[str, VllmEngine], tokens: int, rounds: int) -> dict[str, float]:
    """Each engine's best round; the engines take turns round by round, so a busy spell on the
    machine falls on all of them alike."""
    best = dict.fromkeys(engines, 0.0)
    for round_ in range(rounds + 1):
        for label, engine in engines.items():
            speed, text = await decode_speed(engine, tokens, f"bench-{round_}")
            if not round_:  # the warm-up
                print(f"{label}: {text[:70]!r}")
            else:
                best[label] = max(best[label], speed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("fp16", type=Path)
    parser.add_argument("gptq", type=Path)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    variants = [("fp16", args.fp16, "auto"), ("4-bit, edgeagent's kernel", args.gptq, "edgeagent"),
                ("4-bit, vLLM's kernel (auto)", args.gptq, "auto")]  # fmt: skip
    engines: dict[str, VllmEngine] = {}
    try:
        for label, model, kernel in variants:
            engines[label] = start(model, kernel)

        async def run() -> tuple[dict[str, float], dict[str, list[str]]]:
            kernels = {label: await engine.quantized_kernels() for label, engine in engines.items()}
            return await interleaved(engines, args.tokens, args.rounds), kernels

        speeds, kernels = asyncio.run(run())
    finally:
        for engine in engines.values():
            engine.shutdown()
    for label, speed in speeds.items():
        print(f"{label:32s} {speed:7.1f} tok/s  kernels {kernels[label] or ['(none)']}")
    base = speeds["fp16"]
    for label, speed in speeds.items():
        print(f"{label:32s} {speed / base:5.2f}x the fp16 model")


if __name__ == "__main__":
    main()
