"""The daemon on a GPU: the fit check's predicted memory against NVML's, and a refusal.

Starts `edgeagent serve` on STATE_DIR's current version with the given settings, measures the
GPU memory it takes (NVML's used memory after it serves, less before it started), reads the
fit check's prediction from its log, then asks `edgeagent fit` about a budget too small while
the daemon serves, and checks that the daemon still answers. Prints one JSON object.

    python bench/gpu_memory.py STATE_DIR CACHE_DIR [KEY=VALUE ...]   # EDGEAGENT_* settings
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeagent.client import Client, Parameters
from edgeagent.gpu import NvmlProbe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the shared launcher
from launcher import launch

GiB = 1 << 30


def used_bytes() -> int:
    return NvmlProbe().read().used_bytes  # the device the daemon's fit check reads


def main(state_dir: str, cache_dir: str, settings: list[str]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-gpu-"))
    before = used_bytes()
    started = time.perf_counter()
    daemon = launch(
        workdir, Path(state_dir), Path(cache_dir), dict(item.split("=", 1) for item in settings)
    )
    result: dict[str, object] = {"settings": settings}
    try:
        with Client(daemon.target, timeout=60) as client:
            client.wait_until_serving(timeout=540, daemon=daemon.process)
            result["start_to_serving_s"] = round(time.perf_counter() - started, 1)
            client.generate("warm up", Parameters(max_tokens=8))
            time.sleep(2)
            measured = used_bytes() - before
            text = daemon.log()
            predicted = float(re.findall(r"= ([\d.]+) GiB predicted", text)[-1]) * GiB
            result |= {
                "measured_gib": round(measured / GiB, 3),
                "predicted_gib": round(predicted / GiB, 3),
                "error_pct": round(100 * (predicted - measured) / measured, 2),
                "fit_line": re.findall(r"fit on .*", text)[-1],
            }
            refusal = subprocess.run(
                [sys.executable, "-m", "edgeagent", "fit", "--budget-gib", "9", "--json"],
                env=daemon.env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            result["refusal_exit_code"] = refusal.returncode
            result["refusal_problems"] = json.loads(refusal.stdout)["problems"]
            answer = client.generate("still there?", Parameters(max_tokens=16))
            result["still_serving_tokens"] = answer.completion_tokens
    finally:
        result["exit_code"] = daemon.terminate()
        (Path(os.environ.get("OUT", workdir)) / f"daemon-{int(started)}.log").write_text(
            daemon.log()
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
