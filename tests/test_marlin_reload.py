"""The Marlin workspace fix (edgeagent/engine/marlin_reload.py): a reload keeps the first
workspace, zeroed, where the captured CUDA graphs expect it. Plain tensors stand in for the GPU's;
the hang itself is shown on a GPU by bench/gpu_session.sh (docs/benchmarks.md)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from edgeagent.engine.marlin_reload import _release, keeping_workspace


class _Kernel:
    """What Marlin's processing does to its kernel object: a new workspace every call."""

    size = 4

    def process_weights_after_loading(self, layer: Any) -> None:
        self.workspace = torch.zeros(self.size, dtype=torch.int)
        layer.processed = getattr(layer, "processed", 0) + 1


class _Layer:
    pass


def test_a_reload_keeps_the_first_workspace_zeroed() -> None:
    kernel, layer = _Kernel(), _Layer()
    process = keeping_workspace(_Kernel.process_weights_after_loading)
    process(kernel, layer)
    first = kernel.workspace
    first.fill_(7)  # locks a kernel left behind

    process(kernel, layer)

    assert kernel.workspace is first
    assert torch.equal(first, torch.zeros(4, dtype=torch.int))
    assert layer.processed == 2


def test_a_workspace_of_another_size_is_refused() -> None:
    kernel, layer = _Kernel(), _Layer()
    process = keeping_workspace(_Kernel.process_weights_after_loading)
    process(kernel, layer)
    kernel.size = 8
    with pytest.raises(RuntimeError, match="workspace changed"):
        process(kernel, layer)


@pytest.mark.parametrize(
    ("version", "release"),
    [("0.26.0", (0, 26)), ("0.26.0+cu130", (0, 26)), ("0.27.0rc1", (0, 27)), ("1.2", (1, 2))],
)
def test_release_numbers(version: str, release: tuple[int, int]) -> None:
    assert _release(version) == release
