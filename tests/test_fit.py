"""The fit check: predictions from real safetensors headers, decisions against fake GPUs.

The GPU is the only thing faked here (a `DeviceMemory` reading); the architectures come from
real files: the tiny model, and a Phi-4-shaped GPTQ checkpoint whose safetensors files have
real headers and sparse (unwritten) data, so 8.5 GiB of weights cost no disk.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgeagent.fit import FitRequest, MiB, kv_bytes_per_token, plan
from edgeagent.gpu import DeviceMemory, SystemMemoryProbe
from edgeagent.store.manifest import Architecture, architecture_of, read_config

GiB = 1 << 30
H, INTER, NH, KV, HD, V, G, LAYERS = 5120, 17920, 40, 10, 128, 100352, 128, 40
REQUEST = FitRequest(max_num_seqs=16, max_num_batched_tokens=2048)


def _gpu(total_gib: float, free_gib: float, name: str = "test GPU") -> DeviceMemory:
    return DeviceMemory("gpu", name, int(total_gib * GiB), int(free_gib * GiB))


def _sparse_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A valid safetensors file whose data region is a hole: real header, no bytes written."""
    sizes = {"I32": 4, "F16": 2}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = sizes[dtype] * int(torch.tensor(shape).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)


@pytest.fixture(scope="module")
def phi4_gptq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phi-4's shapes as GPTQ 4-bit g128 (as ../shared/gpu/make_phi4_gptq.py writes them)."""
    model = tmp_path_factory.mktemp("phi4-gptq")

    def qlinear(prefix: str, fin: int, fout: int) -> dict[str, tuple[str, list[int]]]:
        return {
            f"{prefix}.qweight": ("I32", [fin // 8, fout]),
            f"{prefix}.qzeros": ("I32", [fin // G, fout // 8]),
            f"{prefix}.scales": ("F16", [fin // G, fout]),
            f"{prefix}.g_idx": ("I32", [fin]),
        }

    _sparse_safetensors(
        model / "model-emb.safetensors", {"model.embed_tokens.weight": ("F16", [V, H])}
    )
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        tensors = {f"{p}.input_layernorm.weight": ("F16", [H]),
                   f"{p}.post_attention_layernorm.weight": ("F16", [H])}  # fmt: skip
        tensors |= qlinear(f"{p}.self_attn.qkv_proj", H, (NH + 2 * KV) * HD)
        tensors |= qlinear(f"{p}.self_attn.o_proj", NH * HD, H)
        tensors |= qlinear(f"{p}.mlp.gate_up_proj", H, 2 * INTER)
        tensors |= qlinear(f"{p}.mlp.down_proj", INTER, H)
        _sparse_safetensors(model / f"model-layer-{layer:02d}.safetensors", tensors)
    head = {"model.norm.weight": ("F16", [H]), "lm_head.weight": ("F16", [V, H])}
    _sparse_safetensors(model / "model-head.safetensors", head)
    config = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": H,
        "intermediate_size": INTER, "num_attention_heads": NH, "num_key_value_heads": KV,
        "num_hidden_layers": LAYERS, "vocab_size": V, "max_position_embeddings": 16384,
        "torch_dtype": "float16", "tie_word_embeddings": False,
        "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": G, "sym": True},
    }  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def phi4(phi4_gptq: Path) -> Architecture:
    return architecture_of(phi4_gptq, read_config(phi4_gptq))


def test_phi4_weights_and_kv_from_headers(phi4: Architecture, phi4_gptq: Path) -> None:
    assert kv_bytes_per_token(phi4) == 200 * 1024  # 2 x 40 x 10 x 128 x 2 B
    assert 8.4 * GiB < phi4.weight_bytes < 8.6 * GiB  # vLLM: "Model loading took 8.56 GiB"
    assert sum(p.stat().st_blocks for p in phi4_gptq.iterdir()) * 512 < 10 * MiB  # sparse


def test_tiny_weights_match_the_tensors(tiny_model: Path, tiny_fp16: Path) -> None:
    for model in (tiny_model, tiny_fp16):
        arch = architecture_of(model, read_config(model))
        with safe_open(str(model / "model.safetensors"), "pt") as tensors:
            total = sum(
                tensors.get_tensor(k).numel() * tensors.get_tensor(k).element_size()
                for k in tensors.keys()  # noqa: SIM118 (safe_open is not a dict)
            )
        assert arch.weight_bytes == total
        assert kv_bytes_per_token(arch) == 2 * 4 * 2 * 64 * 2


def test_h100_fits_with_the_full_context(phi4: Architecture) -> None:
    verdict = plan(phi4, _gpu(79.6, 79.0, "NVIDIA H100 80GB HBM3"), REQUEST)
    assert verdict.fits
    assert verdict.max_model_len == 16384
    assert verdict.kv_cache_bytes == 200 * 1024 * 16384 * 16  # all 16 sequences at full length
    assert verdict.max_concurrency == 16
    assert verdict.predicted_bytes < 79 * GiB


def test_12gb_edge_gpu_shortens_the_context(phi4: Architecture) -> None:
    verdict = plan(phi4, _gpu(12.0, 11.6), REQUEST)
    assert verdict.fits
    assert 1024 < verdict.max_model_len < 16384
    assert verdict.max_model_len % 16 == 0
    assert verdict.notes == [f"context shortened from the model's 16384 to "
                             f"{verdict.max_model_len} tokens to fit"]  # fmt: skip
    assert verdict.predicted_bytes <= verdict.available_bytes


def test_an_fp8_kv_cache_doubles_the_context_a_12gb_gpu_holds(phi4: Architecture) -> None:
    fp16 = plan(phi4, _gpu(12.0, 11.6), REQUEST)
    fp8 = plan(phi4, _gpu(12.0, 11.6), dataclasses.replace(REQUEST, kv_dtype_bytes=1))
    assert kv_bytes_per_token(phi4, dtype_bytes=1) == 100 * 1024
    assert fp8.kv_cache_bytes == fp16.kv_cache_bytes
    assert fp8.max_model_len >= 2 * fp16.max_model_len - 16


def test_an_explicit_context_that_cannot_fit_is_refused_with_the_number_that_would(
    phi4: Architecture,
) -> None:
    verdict = plan(phi4, _gpu(12.0, 11.6), FitRequest(16, 2048, max_model_len=16384))
    assert not verdict.fits
    assert "lower max_model_len to" in verdict.problems[0]


def test_8gb_gpu_is_refused_naming_the_numbers(phi4: Architecture) -> None:
    verdict = plan(phi4, _gpu(8.0, 7.7, "RTX 4060"), REQUEST)
    assert not verdict.fits
    assert "weights 8.5" in verdict.problems[0]
    assert "7.70 GiB free of 8.00 GiB on RTX 4060" in verdict.problems[0]


def test_other_processes_holding_memory_count(phi4: Architecture) -> None:
    assert plan(phi4, _gpu(24.0, 23.5), REQUEST).fits
    busy = plan(phi4, _gpu(24.0, 9.0), REQUEST)
    assert not busy.fits
    assert "only 8.50 GiB is available" in busy.problems[0]


def test_a_budget_caps_what_edgeagent_takes(phi4: Architecture) -> None:
    budget = FitRequest(16, 2048, budget_bytes=9 * GiB)
    too_small = plan(phi4, _gpu(80.0, 79.0), budget)
    assert not too_small.fits
    assert "a budget of 9.00 GiB" in too_small.problems[0]
    enough = plan(phi4, _gpu(80.0, 79.0), FitRequest(16, 2048, budget_bytes=12 * GiB))
    assert enough.fits
    assert enough.predicted_bytes <= 12 * GiB


def test_an_explicit_kv_cache_is_checked(phi4: Architecture) -> None:
    fixed = plan(phi4, _gpu(24.0, 23.5), FitRequest(16, 2048, kv_cache_bytes=4 * GiB))
    assert fixed.fits
    assert fixed.kv_cache_bytes == 4 * GiB
    assert fixed.max_concurrency == 4 * GiB // (200 * 1024 * fixed.max_model_len)
    too_big = plan(phi4, _gpu(24.0, 23.5), FitRequest(16, 2048, kv_cache_bytes=20 * GiB))
    assert not too_big.fits
    assert "kv_cache_gib 20.00 GiB does not fit" in too_big.problems[0]


def test_cpu_build_counts_system_memory(tmp_path: Path, phi4: Architecture) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:   12288000 kB\n")
    device = SystemMemoryProbe(meminfo).read()
    assert (device.kind, device.total_bytes, device.free_bytes) == (
        "cpu", 16384000 * 1024, 12288000 * 1024,
    )  # fmt: skip
    verdict = plan(phi4, device, REQUEST)
    assert verdict.overhead_bytes > plan(phi4, _gpu(16, 12), REQUEST).overhead_bytes
