"""edgeagent's CPU 4-bit kernel (the AVX2 path), against vLLM's own weight repacking."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    pack_quantized_values_into_int32,
    unpack_quantized_values_into_int32,
)
from vllm.scalar_type import scalar_types

from edgeagent.engine.cpu_kernels import DENSE_PARAMETER, dense_kernel_class, dequantize
from edgeagent.engine.vllm_engine import VllmEngine


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


def _gptq_layer(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> torch.nn.Module:
    """A layer as vLLM's GPTQ method leaves it after loading: qweight packed along the input."""
    layer = torch.nn.Module()
    qweight = torch.nn.Parameter(
        pack_quantized_values_into_int32(q, scalar_types.uint4b8, 0), requires_grad=False
    )
    qweight.input_dim, qweight.output_dim, qweight.packed_dim = 0, 1, 0  # type: ignore[attr-defined]
    w_s = torch.nn.Parameter(scales, requires_grad=False)
    w_s.input_dim, w_s.output_dim = 0, 1  # type: ignore[attr-defined]
    layer.register_parameter("qweight", qweight)
    layer.register_parameter("scales", w_s)
    layer.bias = bias
    return layer


def test_the_kernel_dequantizes_once_into_the_models_dtype_and_matches_a_dense_matmul() -> None:
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )

    generator = torch.Generator().manual_seed(0)
    k, n, group = 256, 128, 128
    q = torch.randint(0, 16, (k, n), generator=generator, dtype=torch.int32)
    scales = torch.rand(k // group, n, generator=generator).half() / 10
    x = torch.randn(3, k, generator=generator).half()
    bias = torch.randn(n, generator=generator).half()
    config = MPLinearLayerConfig((k, n), (k, n), scalar_types.uint4b8, torch.half, group, False)
    kernel = dense_kernel_class()(config, "qweight", "scales")
    layer = _gptq_layer(q, scales, bias)

    kernel.process_weights_after_loading(layer)
    out = kernel.apply_weights(layer, x, bias)

    dense = ((q.float() - 8) * scales.float().repeat_interleave(group, dim=0)).half()
    assert torch.equal(getattr(layer, DENSE_PARAMETER), dense.t())  # in the model's dtype
    assert out.dtype == torch.half
    torch.testing.assert_close(out, (x.float() @ dense.float() + bias.float()).half())


async def test_the_sessions_engine_runs_the_avx2_path(engine: VllmEngine) -> None:
    """The session's engine asks for edgeagent's kernel, so every test on it runs the path an
    AVX2-only CPU takes, even on a CPU whose vLLM build has its own 4-bit kernel."""
    assert await engine.quantized_kernels() == ["EdgeagentWNA16LinearKernel"]
