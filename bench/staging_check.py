"""The one-copy swap's parts on one engine, no second engine needed: version A staged again
from its own checkpoint must answer exactly as A loaded at start (the staged processing gives
the kernels' tensors bit for bit); another version C copied in must change the answer; A's
staged copy put back must restore it. Greedy token ids, 24 tokens. Not a test: for a GPU host,
where the kernels' processing (Marlin's or Machete's repack) differs from the CPU's.

    python bench/staging_check.py MODEL_A MODEL_C [--gpu-memory-utilization 0.1]

On the GPU bundle (`bench/gpu_session.sh`'s preamble for the plugins), with the tiny 4-bit model
carried from a `make demo` store and a noisy copy of it (`bench/perturb_checkpoint.py A C 0.5 2`):
a few MB, and an engine start of about a minute.
"""

import argparse
import asyncio
import time
from pathlib import Path

from edgeagent.engine.interface import EngineConfig, SamplingOptions
from edgeagent.engine.vllm_engine import VllmEngine


async def answer(engine: VllmEngine) -> list[int]:
    ids: list[int] = []
    options = SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    async for delta in engine.stream(
        engine.encode("The quick brown fox"), options, f"r{time.time()}"
    ):
        ids += [t.id for t in delta.tokens]
    return ids


async def check(a: Path, c: Path, gpu_memory_utilization: float) -> None:
    t0 = time.perf_counter()
    config = EngineConfig(
        model_path=a,
        kv_cache_bytes=256 << 20,
        max_num_seqs=4,
        max_model_len=512,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    engine = VllmEngine.start(config)
    print(
        f"started in {time.perf_counter() - t0:.1f} s; kernels {await engine.quantized_kernels()}",
        flush=True,
    )
    a0 = await answer(engine)
    for key, path in (("A-from-disk", a), ("C", c), ("A", None)):
        t = time.perf_counter()
        n = await engine.stage_weights(key, path)
        print(f"staged {key}: {n} bytes in {time.perf_counter() - t:.3f} s", flush=True)
    print("still A while staged:", await answer(engine) == a0)
    print("sets:", await engine.keep_staged(["A-from-disk", "C", "A"]))
    results = {}
    for key in ("A-from-disk", "C", "A"):
        t = time.perf_counter()
        await engine.swap_in_staged(key)
        results[key] = await answer(engine)
        print(f"copied {key} in {time.perf_counter() - t:.3f} s (with one answer)", flush=True)
    print("A staged from disk == A as loaded:", results["A-from-disk"] == a0)
    print("C differs from A:", results["C"] != a0)
    print("A copied back == A as loaded:", results["A"] == a0)
    print(
        "RESULT",
        "OK"
        if results["A-from-disk"] == a0 and results["C"] != a0 and results["A"] == a0
        else "MISMATCH",
    )
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_a", type=Path)
    parser.add_argument("model_c", type=Path)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1)
    args = parser.parse_args()
    asyncio.run(check(args.model_a.resolve(), args.model_c.resolve(), args.gpu_memory_utilization))


if __name__ == "__main__":
    main()
