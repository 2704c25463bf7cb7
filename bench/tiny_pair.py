"""Two versions of the tiny model with one layout (4-bit GPTQ, round-to-nearest: seconds) in a
store, the first current: what `bench/bench_update.py` swaps between on a CPU.

    python bench/tiny_pair.py STATE_DIR     # prints the second version's id
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgeagent.demo.tiny import build_tiny_model
from edgeagent.sources.build import EMBEDDED_RECIPE, BuildRequest, build
from edgeagent.store.store import ModelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state_dir", type=Path)
    args = parser.parse_args()
    store = ModelStore(args.state_dir / "models")
    recipe = EMBEDDED_RECIPE.model_copy(update={"iters": 0})
    versions = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in (0, 1):
            base = build_tiny_model(Path(scratch) / f"tiny-{seed}", seed=seed)
            request = BuildRequest(base=base, recipe=recipe, label=f"tiny-{seed}")
            versions.append(build(store, request).version)
    store.activate(versions[0])
    print(versions[1])


if __name__ == "__main__":
    main()
