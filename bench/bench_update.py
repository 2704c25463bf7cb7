"""Hot swaps under load, against a real daemon: the pause clients see, failed requests, memory.

Starts `edgeagent serve` on STATE_DIR's current version (A), streams from N clients over gRPC
the whole time, and updates through the admin API A → B → A → ... (`--updates` swaps, one every
`--every-s` seconds), then optionally one update to a candidate the quality gate refuses
(`--refused`) and an operator's rollback (`--rollback`). For each swap it prints the daemon's
outcome (pause, reload, smoke test), the longest gap in token delivery any client saw around
it, and the device's used memory (NVML on a GPU) before and after, with the allocator's cache
released. With `--check-answers`, after each swap a greedy 32-token answer is asked for and
compared with the answer of a freshly started engine on the same version (A's before the first
swap; B's from a second daemon started on B after the run). Not a test: numbers only.

    python bench/bench_update.py STATE_DIR CACHE_DIR VERSION_B [--streams 8] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edgeagent.client import Client, Parameters, build_request
from edgeagent.errors import ConfigError
from edgeagent.gpu import NvmlProbe
from edgeagent.store.store import ModelStore
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import admin_pb2_grpc as admin_grpc
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the shared launcher
from launcher import launch

GiB = 1 << 30
CHECK_PROMPT = "The answer after a swap"


@dataclass
class Load:
    arrivals: dict[int, list[float]] = field(default_factory=dict)  # per client, in order
    completed: int = 0
    failures: list[str] = field(default_factory=list)


def device_used_bytes() -> int | None:
    try:
        return NvmlProbe().read().used_bytes
    except (ConfigError, ImportError):  # no NVIDIA GPU: the CPU build
        return None


async def stream_until(target: str, stop: asyncio.Event, load: Load, client: int, tokens: int):
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        while not stop.is_set():
            request = build_request(
                f"Client {client} asks about bridges",
                params=Parameters(max_tokens=tokens, temperature=0.8, seed=client),
            )
            arrivals = load.arrivals.setdefault(client, [])
            try:
                async for _ in stub.GenerateStream(request):
                    arrivals.append(time.perf_counter())
                load.completed += 1
            except grpc.aio.AioRpcError as error:
                load.failures.append(f"{error.code().name}: {error.details()}")


def gaps(arrivals: dict[int, list[float]]) -> Iterator[tuple[float, float]]:
    """(when it ended, how long) for each wait between one client's consecutive messages,
    across its requests."""
    for times in arrivals.values():
        for earlier, later in itertools.pairwise(times):
            yield later, later - earlier


def longest_gap(arrivals: dict[int, list[float]], start: float, end: float) -> float:
    """The longest wait that ends within [start, end]."""
    return max((gap for at, gap in gaps(arrivals) if start <= at <= end), default=0.0)


def steady_gap(arrivals: dict[int, list[float]], windows: list[tuple[float, float]]) -> float:
    """The longest wait ending outside every swap window: what clients see without updates."""
    return max(
        (gap for at, gap in gaps(arrivals) if not any(s <= at <= e for s, e in windows)),
        default=0.0,
    )


def greedy_answer(target: str) -> str:
    with Client(target, timeout=120) as client:
        return client.generate(CHECK_PROMPT, Parameters(max_tokens=32, temperature=0)).text


async def run(
    args: argparse.Namespace, target: str, admin_target: str, version_a: str
) -> dict[str, object]:
    load, stop = Load(), asyncio.Event()
    clients = [
        asyncio.create_task(stream_until(target, stop, load, i, args.max_tokens))
        for i in range(args.streams)
    ]
    swaps, swaps_at = [], []
    answers: list[tuple[str, str]] = []  # (version served, its greedy answer) after each swap
    steps = [args.version_b if i % 2 == 0 else version_a for i in range(args.updates)]
    steps += [args.refused] if args.refused else []
    steps += ["rollback"] if args.rollback else []
    async with grpc.aio.insecure_channel(admin_target) as channel:
        admin = admin_grpc.AdminServiceStub(channel)
        await asyncio.sleep(args.every_s)
        for version in steps:
            before = device_used_bytes()
            asked = time.perf_counter()
            if version == "rollback":
                outcome = await admin.Rollback(admin_pb.RollbackRequest())
            else:
                outcome = await admin.Update(admin_pb.UpdateRequest(version=version))
            answered = time.perf_counter()
            swaps_at.append((asked - 1, answered + 1))
            if args.check_answers:
                served = (await admin.GetStatus(admin_pb.GetStatusRequest())).version
                answers.append((served, await asyncio.to_thread(greedy_answer, target)))
            await asyncio.sleep(args.every_s)
            swaps.append({
                "to": version[:12],
                "result": admin_pb.UpdateResult.Name(outcome.result),
                "method": outcome.method,
                "reason": outcome.reason,
                "pause_s": round(outcome.pause_s, 3),
                "reload_s": round(outcome.reload_s, 3),
                "smoke_s": round(outcome.smoke_s, 3),
                "gate_s": round(outcome.gate_s, 3),
                "update_rpc_s": round(answered - asked, 3),
                "longest_gap_s": round(longest_gap(load.arrivals, asked - 1, answered + 1), 3),
                "used_gib_before": None if before is None else round(before / GiB, 3),
                "used_gib_after": None if (a := device_used_bytes()) is None else round(a / GiB, 3),
            })  # fmt: skip
            print(json.dumps(swaps[-1]), flush=True)
    stop.set()
    await asyncio.gather(*clients)
    return {
        "streams": args.streams,
        "completed": load.completed,
        "failed": len(load.failures),
        "failures": load.failures[:5],
        "messages": sum(len(times) for times in load.arrivals.values()),
        "longest_gap_outside_swaps_s": round(steady_gap(load.arrivals, swaps_at), 3),
        "swaps": swaps,
        "answers_after_swaps": answers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir")
    parser.add_argument("cache_dir")
    parser.add_argument("version_b")
    parser.add_argument("settings", nargs="*", help="EDGEAGENT_*=VALUE for the daemon")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--every-s", type=float, default=5.0)
    parser.add_argument("--check-answers", action="store_true")
    parser.add_argument(
        "--refused",
        help="after the updates, one to this version (expected to be refused by the quality gate)",
    )
    parser.add_argument("--rollback", action="store_true", help="then an operator's rollback")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-update-"))
    settings = {
        "EDGEAGENT_UPDATES__WATCH_DROP_DIR": "false",
        "EDGEAGENT_UPDATES__HUB_POLL_INTERVAL_S": "0",
        # Swaps between random-weight checkpoints, which the quality gate would refuse; pass
        # EDGEAGENT_UPDATES__QUALITY_GATE=true to time it on models that pass it.
        "EDGEAGENT_UPDATES__QUALITY_GATE": "false",
        **dict(item.split("=", 1) for item in args.settings),
    }
    daemon = launch(workdir, Path(args.state_dir), Path(args.cache_dir), settings)
    try:
        with Client(daemon.target, timeout=600) as client:
            client.wait_until_serving(timeout=540, daemon=daemon.process)
            client.generate("warm up", Parameters(max_tokens=8))
        with Client(daemon.admin_target, timeout=60) as admin:
            version_a = admin.status().version
        fresh = {version_a: greedy_answer(daemon.target)} if args.check_answers else {}
        result = asyncio.run(run(args, daemon.target, daemon.admin_target, version_a))
    finally:
        exit_code = daemon.terminate()
        out = Path(os.environ.get("OUT", workdir))
        (out / "daemon-update.log").write_text(daemon.log())
    if args.check_answers:
        fresh |= fresh_answers(args, workdir, settings, exclude=set(fresh))
        result["answers_match_fresh_engines"] = all(
            fresh.get(version) == answer
            for version, answer in result["answers_after_swaps"]
            if version in fresh
        )
        result["fresh_answers"] = fresh
    print(json.dumps(result | {"exit_code": exit_code}, indent=2))


def fresh_answers(
    args: argparse.Namespace, workdir: Path, settings: dict[str, str], exclude: set[str]
) -> dict[str, str]:
    """Each swapped-to version's greedy answer from a daemon started on it (the store's current
    moved there for the start, then put back)."""
    store = ModelStore(Path(args.state_dir) / "models")
    current = store.refs().current
    answers = {}
    try:
        for version in {args.version_b} - exclude:
            store.activate(version)
            (workdir / f"fresh-{version[:12]}").mkdir()
            daemon = launch(workdir / f"fresh-{version[:12]}", Path(args.state_dir),
                            Path(args.cache_dir), settings)  # fmt: skip
            try:
                daemon.wait_until_serving(540)
                answers[version] = greedy_answer(daemon.target)
            finally:
                daemon.terminate()
    finally:
        if current is not None:
            store.activate(current)
    return answers


if __name__ == "__main__":
    main()
