"""Methods vLLM mixes into each of its workers (`worker_extension_cls`), called by name through
`collective_rpc`. Called by name, they need no pickled functions (vLLM would otherwise ask for
`VLLM_ALLOW_INSECURE_SERIALIZATION=1`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any


class WorkerExtension:
    def clear_kv_cache(self) -> int:
        """Zero every KV cache tensor; returns how many there were.

        After new weights are loaded, the blocks still hold keys and values the old weights
        computed. Attention kernels may read unwritten slots of a block and mask them by weight,
        so NaNs left by a broken candidate would poison every later request (seen on CPU: the
        good weights back in, and only "!!!" came out until the cache was zeroed).
        """
        runner: Any = getattr(self, "model_runner", None)
        caches = list(_tensors(getattr(runner, "kv_caches", None)))
        for cache in caches:
            cache.zero_()
        return len(caches)

    def quantized_kernels(self) -> list[str]:
        """The names of the 4-bit kernels this worker's linear layers run on (vLLM picks one
        per layer from its platform's list; edgeagent's CPU plugin may be first in it)."""
        runner: Any = getattr(self, "model_runner", None)
        model: Any = getattr(runner, "model", None)
        kernels = {
            type(method.kernel).__name__
            for module in (model.modules() if model is not None else ())
            if (method := getattr(module, "quant_method", None)) is not None
            and hasattr(method, "kernel")
        }
        return sorted(kernels)

    def release_cached_memory(self) -> int:
        """Give the allocator's cached blocks back to the device; returns the bytes still
        reserved by PyTorch in this worker (0 on the CPU build).

        An in-place reload leaves about 1 GiB of the old weights' blocks cached on an H100,
        which an edge GPU with a few GiB of headroom cannot spare.
        """
        import torch

        gc.collect()
        if not torch.cuda.is_available():
            return 0
        torch.cuda.empty_cache()
        return int(torch.cuda.memory_reserved())


def _tensors(value: Any) -> Iterator[Any]:
    """The tensors in a KV cache structure (a tensor, or lists/tuples/dicts of them)."""
    if value is None:
        return
    if hasattr(value, "zero_"):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
