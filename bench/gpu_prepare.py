"""Make a tokenizer-less checkpoint servable and put it in a store (for GPU runs).

`../shared/gpu/make_phi4_gptq.py` writes Phi-4's shapes with random weights and no tokenizer.
This adds edgeagent's small BPE tokenizer, padded with dummy tokens to the model's vocabulary
(so every id the model emits decodes), with Phi-4's special tokens and chat template, then
imports the directory into the store under STATE_DIR and makes it current.

    python bench/gpu_prepare.py CHECKPOINT_DIR STATE_DIR [--keep-current]

With --keep-current the version is stored but not made current (an update's candidate).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from edgeagent.demo.tiny import write_tokenizer
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore


def main(checkpoint: Path, state_dir: Path, activate: bool) -> None:
    vocab = int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    write_tokenizer(checkpoint, vocab, special_fillers=False)
    store = ModelStore(state_dir / "models")
    started = time.perf_counter()
    manifest = store.import_directory(checkpoint, ImportSource(origin=str(checkpoint)))
    if activate:
        store.activate(manifest.version)
    print(
        f"imported {manifest.version}: {manifest.total_bytes / (1 << 30):.2f} GiB, "
        f"{manifest.quantization_label}, weights {manifest.architecture.weight_bytes} bytes, "
        f"in {time.perf_counter() - started:.1f} s (copy + sha256 + commit)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), activate="--keep-current" not in sys.argv[3:])
