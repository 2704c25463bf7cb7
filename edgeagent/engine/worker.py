"""Methods vLLM mixes into each of its workers (`worker_extension_cls`), called by name through
`collective_rpc`. Called by name, they need no pickled functions (vLLM would otherwise ask for
`VLLM_ALLOW_INSECURE_SERIALIZATION=1`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeagent.engine.staging import Stager


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

    # A method that raises here takes the engine down with it (vLLM's executor treats a failed
    # RPC as a dead worker), so staging's failures come back as answers: ("error", why).

    def begin_staging(self, key: str, weights_path: str | None) -> tuple[str, Any]:
        """Start staging `key`'s weights in host memory (`staging.py`): a checkpoint directory,
        or None for the weights serving now; how many `stage_group` calls it takes."""
        return _answer(lambda: self._stager().begin(key, weights_path))

    def stage_group(self, key: str, index: int) -> tuple[str, Any]:
        """Stage one group (a decoder layer) of `key`; the bytes staged so far."""
        return _answer(lambda: self._stager().stage_group(key, index))

    def swap_in_staged(self, key: str) -> float:
        """Copy `key`'s staged weights into the serving tensors; the seconds it took."""
        return self._stager().swap_in(key)

    def keep_staged(self, keys: list[str]) -> dict[str, int]:
        """Drop every staged set but `keys`'; the sets left, with their bytes."""
        stager = self._stager()
        stager.keep_only(keys)
        return stager.staged()

    def _stager(self) -> Stager:
        from edgeagent.engine.staging import Stager

        stager = getattr(self, "_edgeagent_stager", None)
        if stager is None:
            import torch

            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            on_gpu = any(p.is_cuda for p in model.parameters()) and torch.cuda.is_available()
            stager = Stager(model, device_is_gpu=on_gpu)
            self._edgeagent_stager = stager
        return stager

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


def _answer(work: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", work()
    except Exception as error:  # whatever the staging met: the candidate is reloaded instead
        logging.getLogger(__name__).exception("staging failed")
        return "error", f"{type(error).__name__}: {error}"


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
