"""edgeagent's torch version of vLLM's CPU 4-bit GEMM, against vLLM's own weight repacking."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    pack_quantized_values_into_int32,
    unpack_quantized_values_into_int32,
)
from vllm.scalar_type import scalar_types

from edgeagent.engine.cpu_kernels import _gemm_wna16, dequantize


def _vllm_cpu_layout(q: torch.Tensor) -> torch.Tensor:
    """GPTQ packing (along the input dim), then CPUWNA16LinearKernel's repacking, verbatim."""
    gptq = pack_quantized_values_into_int32(q, scalar_types.uint4b8, 0)
    k = gptq.size(0) * 8
    weight = unpack_quantized_values_into_int32(gptq, scalar_types.uint4b8, 0)
    weight = pack_quantized_values_into_int32(weight, scalar_types.uint4b8, 1)
    return weight.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()


@pytest.mark.parametrize(("k", "n", "group"), [(256, 512, 128), (512, 96, 128), (128, 64, 32)])
def test_dequantize_undoes_vllms_layout(k: int, n: int, group: int) -> None:
    generator = torch.Generator().manual_seed(k + n)
    q = torch.randint(0, 16, (k, n), generator=generator, dtype=torch.int32)
    scales = torch.rand(k // group, n, generator=generator).half() / 10
    expected = (q.float() - 8) * scales.float().repeat_interleave(group, dim=0)

    assert torch.equal(dequantize(_vllm_cpu_layout(q), scales, None, 8), expected)


def test_gemm_matches_a_dense_matmul() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (256, 128), generator=generator, dtype=torch.int32)
    scales = torch.rand(2, 128, generator=generator).half() / 10
    x = torch.randn(3, 256, generator=generator).half()
    bias = torch.randn(128, generator=generator).half()
    out = torch.empty(3, 128, dtype=torch.half)

    _gemm_wna16(x, _vllm_cpu_layout(q), out, scales, None, bias, 8, "vec")

    dense = (q.float() - 8) * scales.float().repeat_interleave(128, dim=0)
    torch.testing.assert_close(out, (x.float() @ dense + bias.float()).half())
