"""Weights staged in host memory, in the serving kernels' layout: the one-copy swap (issue 28).

Runs inside vLLM's worker (through `worker.WorkerExtension`), never in the daemon.

A candidate is staged while the engine serves, one decoder layer per call, so decode steps run
between calls: its checkpoint tensors go through vLLM's own layerwise reload of each module
(`model_loader/reload/layerwise.py`: the checkpoint-shaped tensors materialized on the device,
loaded, processed by the module's quantization method, Marlin's repack among them), except that
the processed values are copied into host buffers instead of the module's own tensors; the
module's serving tensors are put back untouched before the call returns. The processing needs
only one module's checkpoint tensors on the device at a time. Any state the processing leaves
outside tensors (vLLM's CPU build keeps a packed weight in a closure, `cpu_linear`) is kept
beside the buffers and put in place at the swap.

The swap is then one host-to-device copy into the serving tensors: the CUDA graphs captured
their storage, so nothing else changes. The serving version's tensors are copied to host
buffers too (`keep`), so a refused candidate or a rollback is one copy back. Buffers are pinned
on a GPU (pinned copies run at the link's speed) and reused from one staging to the next.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
REST = -1  # the group of everything outside the decoder layers (embeddings, norm, lm_head)
# Bookkeeping of nn.Module and of vLLM's processing, never the processing's result.
_NOT_STATE = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
    "_already_called_process_weights_after_loading",
})  # fmt: skip


class StagingError(RuntimeError):
    """The candidate cannot be staged (the caller reloads it from disk instead)."""


@dataclass
class _Attributes:
    """A module's (or its quantization method's, or kernel's) plain attributes to set."""

    owner: Any
    values: dict[str, Any]


@dataclass
class StagedSet:
    """One version's weights in host memory: (serving tensor, host copy) pairs, and the plain
    attributes its processing set."""

    groups: list[tuple[int, list[tuple[str, Any]]]]  # (layer index or REST, its modules)
    weights_path: Path | None  # None: a copy of what serves now
    pairs: list[tuple[Any, Any]] = field(default_factory=list)
    attributes: list[_Attributes] = field(default_factory=list)
    staged_groups: int = 0

    @property
    def complete(self) -> bool:
        return self.staged_groups == len(self.groups)

    @property
    def nbytes(self) -> int:
        return sum(int(host.nbytes) for _, host in self.pairs)


class HostPool:
    """Host buffers by shape and dtype, reused across stagings (pinning is slow)."""

    def __init__(self, pin: bool) -> None:
        self._pin = pin
        self._free: dict[tuple[tuple[int, ...], Any], list[Any]] = {}

    def take(self, like: Any) -> Any:
        import torch

        free = self._free.get((tuple(like.shape), like.dtype))
        if free:
            return free.pop()
        return torch.empty(tuple(like.shape), dtype=like.dtype, device="cpu",
                           pin_memory=self._pin)  # fmt: skip

    def give_back(self, tensor: Any) -> None:
        self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)

    def release(self) -> None:
        self._free.clear()


class Stager:
    """The staged sets of one worker's model."""

    def __init__(self, model: Any, device_is_gpu: bool) -> None:
        self._model = model
        self._gpu = device_is_gpu
        self._pool = HostPool(pin=device_is_gpu)
        self._sets: dict[str, StagedSet] = {}

    # -- what the daemon calls, through the worker --------------------------------------

    def begin(self, key: str, weights_path: str | None) -> int:
        """Start staging `key` (a checkpoint directory, or None: what serves now); the number
        of groups to stage with `stage_group`. A set already complete is kept (0 groups)."""
        existing = self._sets.get(key)
        if existing is not None and existing.complete:
            return 0
        self.drop(key)
        path = Path(weights_path) if weights_path is not None else None
        self._sets[key] = StagedSet(_modules_by_group(self._model), path)
        return len(self._sets[key].groups)

    def stage_group(self, key: str, index: int) -> int:
        """Stage the `index`th group of `key`; the bytes staged so far."""
        staged = self._sets.get(key)
        if staged is None or index != staged.staged_groups:
            raise StagingError(f"staging {key}: group {index} asked out of order")
        group, modules = staged.groups[index]
        try:
            if staged.weights_path is None:
                self._copy_serving(staged, modules)
            else:
                self._process_candidate(staged, modules, group)
        except BaseException:
            self.drop(key)
            raise
        staged.staged_groups += 1
        return staged.nbytes

    def swap_in(self, key: str) -> float:
        """Copy `key`'s staged weights into the serving tensors; the seconds it took."""
        import torch

        staged = self._sets.get(key)
        if staged is None or not staged.complete:
            raise StagingError(f"{key} is not staged")
        started = time.perf_counter()
        with torch.no_grad():
            for serving, host in staged.pairs:
                serving.copy_(host, non_blocking=True)
        for attributes in staged.attributes:
            for name, value in attributes.values.items():
                setattr(attributes.owner, name, value)
        if self._gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def drop(self, key: str) -> None:
        """Forget `key`'s set; its buffers go back to the pool."""
        staged = self._sets.pop(key, None)
        for _, host in staged.pairs if staged is not None else ():
            self._pool.give_back(host)

    def keep_only(self, keys: Iterable[str]) -> None:
        """Drop every set but `keys`'; with none left, the pooled buffers are freed too."""
        for key in set(self._sets) - set(keys):
            self.drop(key)
        if not self._sets:
            self._pool.release()

    def staged(self) -> dict[str, int]:
        """The complete sets and their bytes."""
        return {key: s.nbytes for key, s in self._sets.items() if s.complete}

    # -- the work -------------------------------------------------------------------------

    def _copy_serving(self, staged: StagedSet, modules: list[tuple[str, Any]]) -> None:
        """What serves now, copied to host buffers, with the plain attributes any other set
        changes on these modules (so swapping this set back restores them)."""
        import torch
        from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

        with torch.no_grad():
            for _, module in modules:
                for tensor in get_layer_tensors(module).values():
                    host = self._pool.take(tensor)
                    host.copy_(tensor)
                    staged.pairs.append((tensor, host))
                for owner in _state_owners(module):
                    names = {n for other in self._sets.values() for a in other.attributes
                             if a.owner is owner for n in a.values}  # fmt: skip
                    if names:
                        values = {n: getattr(owner, n) for n in names if hasattr(owner, n)}
                        staged.attributes.append(_Attributes(owner, values))

    def _process_candidate(
        self, staged: StagedSet, modules: list[tuple[str, Any]], group: int
    ) -> None:
        from vllm.model_executor.model_loader.reload import layerwise
        from vllm.model_executor.model_loader.reload.meta import restore_layer_on_meta

        assert staged.weights_path is not None
        saved = [_Saved.of(module) for _, module in modules]
        hosts: list[tuple[dict[str, Any], dict[str, Any]]] = []
        try:
            for (_, module), kept in zip(modules, saved, strict=True):
                info = layerwise.get_layerwise_info(module)
                host = (
                    {n: _as_parameter(self._pool.take(t)) for n, t in kept.parameters.items()},
                    # vLLM's reload skips some buffers (those it did not load, or that the
                    # processing dropped): starting from the serving values, a skipped one is
                    # copied back as it was
                    {n: self._pool.take(t).copy_(t) for n, t in kept.buffers.items()},
                )
                hosts.append(host)
                info.kernel_tensors = host
                info.kernel_non_persistent_buffers = set(kept.non_persistent)
                restore_layer_on_meta(module, info)
                layerwise.initialize_online_processing(module)
            self._model.load_weights(_checkpoint_tensors(staged.weights_path, group))
            for name, module in modules:
                info = layerwise.get_layerwise_info(module)
                if not info.can_load():
                    continue  # processed as its last tensor arrived
                if not info.load_numel:
                    raise StagingError(f"the checkpoint has no weights for {name}")
                layerwise._layerwise_process(module, info)  # some elements were padding
            for kept, (_, module), (params, buffers) in zip(saved, modules, hosts, strict=True):
                staged.pairs += [(kept.parameters[n], t.data) for n, t in params.items()]
                staged.pairs += [(kept.buffers[n], t) for n, t in buffers.items()]
                staged.attributes += kept.changes(module)
        except BaseException:
            for params, buffers in hosts:
                for tensor in (*params.values(), *buffers.values()):
                    self._pool.give_back(tensor.data)
            raise
        finally:
            for kept, (_, module) in zip(saved, modules, strict=True):
                kept.put_back(module)
            layerwise.LOADING_LAYERS.clear()


@dataclass
class _Saved:
    """A serving module's tensors and plain attributes, to put back after its processing."""

    parameters: dict[str, Any]
    buffers: dict[str, Any]
    non_persistent: set[str]
    attributes: list[tuple[Any, dict[str, Any]]]

    @classmethod
    def of(cls, module: Any) -> _Saved:
        from vllm.model_executor.model_loader.reload.utils import get_layer_params_buffers

        parameters, buffers = get_layer_params_buffers(module)
        return cls(dict(parameters), dict(buffers), set(module._non_persistent_buffers_set),
                   [(owner, _plain(owner)) for owner in _state_owners(module)])  # fmt: skip

    def changes(self, module: Any) -> list[_Attributes]:
        """The plain attributes the processing set (compared by identity), as it left them."""
        changed = []
        for owner, before in self.attributes:
            after = _plain(owner)
            values = {n: v for n, v in after.items() if n not in before or before[n] is not v}
            if values:
                changed.append(_Attributes(owner, values))
        return changed

    def put_back(self, module: Any) -> None:
        from vllm.model_executor.model_loader.reload import layerwise
        from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

        for name in get_layer_tensors(module):
            delattr(module, name)
        for name, parameter in self.parameters.items():
            module.register_parameter(name, parameter)
        for name, buffer in self.buffers.items():
            module.register_buffer(name, buffer, persistent=name not in self.non_persistent)
        for owner, before in self.attributes:
            for name in set(_plain(owner)) - set(before):
                delattr(owner, name)
            for name, value in before.items():
                setattr(owner, name, value)
        info: Any = layerwise.get_layerwise_info(module)
        info.reset()


def _as_parameter(tensor: Any) -> Any:
    """`tensor`'s storage as a parameter (vLLM registers what it copies into on the layer)."""
    import torch

    return torch.nn.Parameter(tensor, requires_grad=False)


def _plain(owner: Any) -> dict[str, Any]:
    return {n: v for n, v in vars(owner).items() if n not in _NOT_STATE}


def _state_owners(module: Any) -> list[Any]:
    """The objects whose attributes a module's processing may set: the module, its
    quantization method and that method's kernel."""
    owners = [module]
    method = getattr(module, "quant_method", None)
    if method is not None and hasattr(method, "__dict__"):
        owners.append(method)
        kernel = getattr(method, "kernel", None)
        if kernel is not None and hasattr(kernel, "__dict__"):
            owners.append(kernel)
    return owners


def _group_of(name: str) -> int:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else REST


def _modules_by_group(model: Any) -> list[tuple[int, list[tuple[str, Any]]]]:
    """The modules to stage, by decoder layer in order, then the rest (REST)."""
    groups: dict[int, list[tuple[str, Any]]] = {}
    for name, module in _loaded_modules(model):
        groups.setdefault(_group_of(name + "."), []).append((name, module))
    return sorted(groups.items(), key=lambda item: (item[0] == REST, item[0]))


def _loaded_modules(model: Any) -> Iterator[tuple[str, Any]]:
    """The modules whose own parameters come from the checkpoint (attention modules' scales
    are processed by vLLM after everything else, and a reload keeps them)."""
    is_attention = _attention_check()
    for name, module in model.named_modules():
        if module._parameters and not is_attention(module):
            yield name, module


def _attention_check() -> Callable[[Any], bool]:
    """vLLM's test for the layers its reload processes last: a function since vLLM 0.27, the
    attention classes in 0.26 (the GPU bundle's)."""
    try:
        from vllm.model_executor.layers.attention import is_deferred_attention_layer
    except ImportError:
        from vllm.model_executor.layers.attention import Attention, MLAAttention

        return lambda module: isinstance(module, (Attention, MLAAttention))
    return is_deferred_attention_layer


def _checkpoint_tensors(weights_path: Path, group: int) -> Iterator[tuple[str, Any]]:
    """The checkpoint's tensors of one group, read from its safetensors files."""
    from safetensors import safe_open

    files = sorted(weights_path.glob("*.safetensors"))
    if not files:
        raise StagingError(f"no safetensors files in {weights_path}")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is no mapping)
                if _group_of(name) == group:
                    yield name, weights.get_tensor(name)
