"""How long a full garbage collection holds the GIL in a process that serves with vLLM, with and
without the heap of vLLM's imports frozen as the engine wrapper freezes it
(`freeze_import_heap` in edgeagent/engine/vllm_engine.py). Each mode runs in a fresh process.

    .venv/bin/python bench/gc_pause.py [--model DIR]

Starts one engine (default: the random-weight tiny model built like the embedded default), times
three `gc.collect()` calls while it runs and one after it stops (what a swap's old engine costs
every stream), and prints the objects the collector walks. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_serving import Sizes, prepare_store, start_raw

from edgeagent.engine.vllm_engine import freeze_import_heap


def collect_ms() -> tuple[float, int]:
    started = time.perf_counter()
    collected = gc.collect()
    return 1000 * (time.perf_counter() - started), collected


def measure(model: Path, freeze: bool) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401  # the engine's imports
    from vllm.v1.engine import async_llm  # noqa: F401

    if freeze:
        freeze_import_heap()
    llm = start_raw(model, Sizes(0.25, 4, 1024, 1024))
    walked = len(gc.get_objects())
    running = [collect_ms()[0] for _ in range(3)]
    llm.shutdown()
    del llm
    after_stop, freed = collect_ms()
    print(
        f"| {'frozen' if freeze else 'not frozen'} | {gc.get_freeze_count():,} | {walked:,} | "
        + " / ".join(f"{ms:.1f}" for ms in running)
        + f" | {after_stop:.1f} ({freed} objects freed) |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, help="default: the embedded tiny model")
    parser.add_argument("--mode", choices=["frozen", "not-frozen"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        measure(args.model, freeze=args.mode == "frozen")
        return
    model = args.model or prepare_store(Path(tempfile.mkdtemp()) / "state", None, reuse=False)
    print("| import heap | objects frozen | objects walked | full collection, engine running "
          "(ms) | after the engine stopped (ms) |\n|---|---|---|---|---|")  # fmt: skip
    for mode in ("not-frozen", "frozen"):
        subprocess.run(
            [sys.executable, __file__, "--model", str(model), "--mode", mode],
            check=True, stderr=subprocess.DEVNULL,
        )  # fmt: skip


if __name__ == "__main__":
    main()
