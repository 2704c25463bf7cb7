"""A vLLM plugin: in-place weight reloads that keep Marlin's workspace where the graphs expect it.

vLLM 0.26's `reload_weights` re-runs each layer's `process_weights_after_loading` and copies
the new parameters back into the storage the CUDA graphs captured. Marlin's kernel object also
holds a workspace (`MarlinLinearKernel.workspace`, the int32 locks of its split-K reduction),
which is neither a parameter nor a buffer: each reload allocated a new one and freed the old,
while the captured graphs went on passing the old address to `marlin_gemm`. Once the allocator
handed that memory to something else, a lock never read zero and the next step spun for ever:
the in-place update hang of issue 26 (measured on an H100). vLLM 0.27 fixes it the same way
(upstream PR 48438): the old workspace is zeroed and kept. Machete keeps no such tensor.

vLLM loads `register` in each of its processes (entry point `vllm.general_plugins`); it patches
nothing on vLLM builds that carry the fix, or that have no Marlin kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

FIXED_IN = (0, 27)
_PATCHED = "_edgeagent_keeps_workspace"


def register() -> None:
    try:
        from vllm import __version__ as vllm_version
        from vllm.model_executor.kernels.linear.mixed_precision import marlin
    except ImportError:  # a build without Marlin (the CPU build has it, but never runs it)
        return
    if _release(vllm_version) >= FIXED_IN:
        return
    kernel: Any = marlin.MarlinLinearKernel
    original = kernel.process_weights_after_loading
    if not getattr(original, _PATCHED, False):
        kernel.process_weights_after_loading = keeping_workspace(original)
        logger.info("vLLM %s: Marlin reloads keep their workspace (edgeagent's fix)", vllm_version)


def keeping_workspace(process: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """`process` (a Marlin kernel's processing), run again on a reload, with the first
    workspace zeroed and kept instead of the new one."""

    def process_weights_after_loading(self: Any, layer: Any) -> None:
        kept: Any = getattr(self, "workspace", None)
        process(self, layer)
        new: Any = getattr(self, "workspace", None)
        if kept is None or new is None or new is kept:
            return
        if (kept.shape, kept.dtype, kept.device) != (new.shape, new.dtype, new.device):
            raise RuntimeError(
                f"Marlin's workspace changed from {tuple(kept.shape)} {kept.dtype} to "
                f"{tuple(new.shape)} {new.dtype} on a reload; the captured graphs would use "
                "the old one"
            )
        kept.zero_()  # its locks must read zero at every launch
        self.workspace = kept

    setattr(process_weights_after_loading, _PATCHED, True)
    return process_weights_after_loading


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.26.0+cu130" or "0.27.0rc1"."""
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)
