"""An AVX-512 machine made to run as an x86-64 CPU with AVX2 and no AVX-512 would
(`make test-avx2-only`, which puts this directory on PYTHONPATH for every process it starts).

The libraries' own caps (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, set
by the Makefile) cover torch's, oneDNN's and MKL's kernels. vLLM picks its kernel library
(`_C_AVX2` or an AVX-512 one) and its attention ISA by asking torch whether the CPU has AVX-512,
which reads the hardware: here torch answers no, as it would on an AVX2 machine. Nothing is
imported at start: the answer is patched in when `torch.cpu` is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

PATCHED = "torch.cpu"


def _no(*_: Any) -> bool:
    return False


def _answer_like_an_avx2_cpu(module: ModuleType) -> None:
    module._is_avx512_supported = _no  # type: ignore[attr-defined]
    module._is_avx512_vnni_supported = _no  # type: ignore[attr-defined]
    module._is_avx512_bf16_supported = _no  # type: ignore[attr-defined]
    module._is_amx_tile_supported = _no  # type: ignore[attr-defined]


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _answer_like_an_avx2_cpu(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != PATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
