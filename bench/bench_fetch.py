"""Fetch throughput from a hub-compatible server on loopback: edgeagent vs huggingface_hub.

Both download the same repo (one large safetensors file plus a tiny model's small files) from
the test suite's hub server, interleaved, each into a fresh directory:
- `hf_hub_download`: huggingface_hub's own download into its cache (size check only);
- `edgeagent fetch`: resolve, resumable download into staging, sha256 of every file, commit.

    .venv/bin/python bench/bench_fetch.py [--size-mib 1024] [--rounds 3]

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hub_server import HubServer  # noqa: E402

from edgeagent.demo.tiny import build_tiny_model  # noqa: E402
from edgeagent.sources.fetch import HubFetcher, HubTarget  # noqa: E402
from edgeagent.store.store import ModelStore  # noqa: E402

MiB = 1 << 20


def make_model(workdir: Path, size_mib: int) -> Path:
    model = build_tiny_model(workdir / "model")
    weights = torch.randint(0, 255, (size_mib * MiB,), dtype=torch.uint8)
    save_file({"weights": weights}, str(model / "model.safetensors"))
    return model


def time_hf(hub: HubServer, workdir: Path, files: list[str]) -> float:
    cache = workdir / "hf-cache"
    started = time.perf_counter()
    for name in files:
        hf_hub_download("bench/model", name, cache_dir=cache, endpoint=hub.endpoint)
    elapsed = time.perf_counter() - started
    shutil.rmtree(cache)
    return elapsed


def time_edgeagent(hub: HubServer, workdir: Path) -> float:
    store = ModelStore(workdir / "store")
    started = time.perf_counter()
    HubFetcher(store, endpoint=hub.endpoint).fetch(HubTarget.parse("bench/model"))
    elapsed = time.perf_counter() - started
    shutil.rmtree(store.root)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=REPO / ".cache") as tmp, HubServer() as hub:
        workdir = Path(tmp)
        model = make_model(workdir, args.size_mib)
        hub.add_repo("bench/model").commit(model)
        files = sorted(p.name for p in model.iterdir())
        total = sum(p.stat().st_size for p in model.iterdir())
        hf, ours = [], []
        for _ in range(args.rounds):
            hf.append(time_hf(hub, workdir, files))
            ours.append(time_edgeagent(hub, workdir))
    hf_rate, our_rate = total / MiB / statistics.median(hf), total / MiB / statistics.median(ours)
    print(f"{total / MiB:.0f} MiB, {args.rounds} interleaved rounds, medians:\n")
    print("| client | MiB/s | s |")
    print("|---|---|---|")
    print(f"| huggingface_hub hf_hub_download | {hf_rate:.0f} | {statistics.median(hf):.2f} |")
    ours_s = statistics.median(ours)
    print(f"| edgeagent fetch (+ sha256, commit) | {our_rate:.0f} | {ours_s:.2f} |")
    print(f"\nratio edgeagent / huggingface_hub: {our_rate / hf_rate:.2f}")


if __name__ == "__main__":
    main()
