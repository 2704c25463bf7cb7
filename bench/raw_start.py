"""Raw vLLM's start in a fresh process: import, `LLM(...)` up, one request. Run it twice with
one `VLLM_CACHE_ROOT` to see a cold and a warm compile cache (set `VLLM_USE_AOT_COMPILE` to
compare vLLM's two caches). Not a test: numbers only.

    VLLM_CACHE_ROOT=/tmp/cache python bench/raw_start.py MODEL_DIR
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()


def main() -> None:
    from vllm import LLM, SamplingParams

    imported = time.monotonic()
    llm = LLM(model=sys.argv[1], max_model_len=512, max_num_seqs=4,
              kv_cache_memory_bytes=256 << 20)  # fmt: skip
    up = time.monotonic()
    llm.generate(["hello"], SamplingParams(max_tokens=4))
    aot = os.environ.get("VLLM_USE_AOT_COMPILE", "default")
    print(f"aot={aot} import {imported - STARTED:.1f} s, start {up - imported:.1f} s, "
          f"first request {time.monotonic() - up:.2f} s", flush=True)  # fmt: skip
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
