"""Start to first token: the daemon (`edgeagent serve`) against raw vLLM, each in a new process.

The daemon side starts `edgeagent serve` on STATE_DIR's current version and asks for one token
every 20 ms on a fresh connection until one comes back (a tight poll: a gRPC channel's reconnect
backoff would add seconds); it prints that time, the daemon's own start timeline and vLLM's
timing lines from the log. The raw side (`--raw MODEL`) times a new Python process that imports
vLLM, builds `AsyncLLM` with the daemon's arguments and generates one token. Not a test.

    python bench/bench_start.py daemon STATE_DIR CACHE_DIR [--label L] [KEY=VALUE ...]
    python bench/bench_start.py raw MODEL_DIR CACHE_DIR [--label L] [KEY=VALUE ...]

KEY=VALUE are EDGEAGENT_* settings (the sizes: KV cache, sequences, context); the raw side reads
the same keys for its sizes. One JSON object per run goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from edgeagent.client import Parameters, build_request
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the shared launcher
from launcher import launch

POLL_S = 0.02
VLLM_TIMINGS = {
    "weights_s": r"Loading weights took ([\d.]+) s",
    "model_loading_s": r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) s",
    "dynamo_bytecode_s": r"Dynamo bytecode transform time: ([\d.]+) s",
    "compile_s": r"torch\.compile takes ([\d.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) sec",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
}


def vllm_timings(log: str) -> dict[str, float]:
    found = {}
    for key, pattern in VLLM_TIMINGS.items():
        if matches := re.findall(pattern, log):
            found[key] = float(matches[-1])
    return found


def first_token_s(target: str, started: float, process: subprocess.Popen[bytes]) -> float:
    request = build_request("Hello", params=Parameters(max_tokens=1))
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the process exited ({process.returncode}) before a first token")
        try:
            with grpc.insecure_channel(target) as channel:
                reply = pb_grpc.GenerationServiceStub(channel).Generate(request, timeout=30)
            if reply.completion_tokens:
                return time.perf_counter() - started
        except grpc.RpcError:
            pass  # not listening yet, or listening but not serving yet
        time.sleep(POLL_S)


def run_daemon(state_dir: str, cache_dir: str, settings: dict[str, str]) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-start-"))
    started = time.perf_counter()
    daemon = launch(workdir, Path(state_dir), Path(cache_dir), settings)
    try:
        seconds = first_token_s(daemon.target, started, daemon.process)
    finally:
        daemon.terminate()
    log = daemon.log()
    if out := os.environ.get("OUT"):
        (Path(out) / f"start-{int(time.time())}.log").write_text(log)
    table = re.search(r"after the process started:\n((?:  .*\n)+)", log)
    return {"start_to_first_token_s": round(seconds, 2), "vllm": vllm_timings(log),
            "timeline": table.group(1).rstrip().splitlines() if table else []}  # fmt: skip


def run_raw(model: str, cache_dir: str, settings: dict[str, str]) -> dict[str, object]:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(Path(cache_dir) / "vllm")}
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, "raw-child", model, json.dumps(settings)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"raw vLLM failed:\n{child.stderr[-4000:]}")
    return {"start_to_first_token_s": round(seconds, 2), "vllm": vllm_timings(child.stderr)}


def raw_child(model: str, settings: dict[str, str]) -> None:
    """In a new process: import vLLM, start AsyncLLM as the daemon would, one token, exit."""
    import asyncio

    from bench_serving import Sizes, start_raw
    from vllm import SamplingParams

    def setting(key: str, default: str) -> str:
        return settings.get(f"EDGEAGENT_MODEL__{key}", default)

    sizes = Sizes(
        kv_cache_gib=float(setting("KV_CACHE_GIB", "1.5")),
        max_num_seqs=int(setting("MAX_NUM_SEQS", "32")),
        max_model_len=int(setting("MAX_MODEL_LEN", "4096")),
        max_num_batched_tokens=int(setting("MAX_NUM_BATCHED_TOKENS", "8192")),
        gpu_memory_utilization=0.3 if os.environ.get("CUDA_VISIBLE_DEVICES") != "" else None,
    )

    async def one_token() -> None:
        llm = start_raw(Path(model), sizes)
        try:
            async for _ in llm.generate("Hello", SamplingParams(max_tokens=1), "first"):
                pass
        finally:
            llm.shutdown()

    asyncio.run(one_token())


def main() -> None:
    if sys.argv[1] == "raw-child":
        raw_child(sys.argv[2], json.loads(sys.argv[3]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["daemon", "raw"])
    parser.add_argument("source", help="STATE_DIR for the daemon, MODEL_DIR for raw")
    parser.add_argument("cache_dir")
    parser.add_argument("--label", default="")
    parser.add_argument("settings", nargs="*", help="EDGEAGENT_* KEY=VALUE")
    args = parser.parse_intermixed_args()
    settings = dict(item.split("=", 1) for item in args.settings)
    run = run_daemon if args.side == "daemon" else run_raw
    result = {"side": args.side, "label": args.label, **run(args.source, args.cache_dir, settings)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
