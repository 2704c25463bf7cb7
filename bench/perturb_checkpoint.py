"""A copy of a 4-bit GPTQ checkpoint with noise on its scales: another version of the same
layout, close to the original (a small `relative_noise`: the quality gate passes it) or far from
it (a large one: the gate refuses it). Not a test.

    python bench/perturb_checkpoint.py SOURCE_DIR OUT_DIR RELATIVE_NOISE SEED
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturb(source: Path, out: Path, relative_noise: float, seed: int) -> int:
    """Copy `source` to `out`, each `*.scales` tensor times (1 + noise); the tensors changed."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    for path in sorted(source.glob("*.safetensors")):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if name.endswith(".scales"):
                noise = torch.randn(tensor.shape, generator=generator) * relative_noise
                tensors[name] = (tensor.float() * (1 + noise)).to(tensor.dtype)
                changed += 1
        save_file(tensors, out / path.name, metadata={"format": "pt"})
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("relative_noise", type=float)
    parser.add_argument("seed", type=int)
    args = parser.parse_args()
    changed = perturb(args.source, args.out, args.relative_noise, args.seed)
    print(f"{args.out}: {changed} scale tensors x (1 + {args.relative_noise:g} N(0, 1))")


if __name__ == "__main__":
    main()
