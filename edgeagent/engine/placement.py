"""Where a version's engine goes: the placement policy, next to the fit check it reads.

A start from nothing starts an engine. An update over a serving engine goes beside it where the
mode allows and the fit check gives a second engine at least the serving one's context and
sequences; otherwise the weights are reloaded in place when the architecture and quantization
layout match, else the engine is restarted on the candidate if that fits. `updates.swap` is the
mode. `require_fit` is the one "does not fit" refusal.
"""

from __future__ import annotations

from typing import Literal

from edgeagent.errors import LoadError
from edgeagent.fit import Plan
from edgeagent.settings import GiB, SwapMode
from edgeagent.store.manifest import Manifest

Placement = Literal["beside", "reload", "restart"]

LAYOUT_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")


def require_fit(manifest: Manifest, fit: Plan) -> None:
    """Refuse `manifest` when its fit check says it does not fit (LoadError naming why)."""
    if not fit.fits:
        raise LoadError(f"{manifest.version} does not fit: " + "; ".join(fit.problems))


def same_layout(a: Manifest, b: Manifest) -> bool:
    """In-place reload needs the same tensors: the architecture and the quantization layout
    (not the recipe that produced the numbers) alike."""

    def layout(m: Manifest) -> dict[str, object]:
        return {key: (m.quantization or {}).get(key) for key in LAYOUT_KEYS}

    return a.architecture == b.architecture and layout(a) == layout(b)


def beside_verdict(mode: SwapMode, second: Plan, first: Plan) -> tuple[bool, str]:
    """Whether an update's engine may start beside the serving one (sized by `first`), with
    the reason: the mode allows it and the fit check (`second`, planned in what `first` leaves)
    gives it at least the serving engine's context and sequences."""
    if mode == "in_place":
        return False, "updates.swap is in_place"
    if not second.fits:
        return False, "no room for a second engine: " + "; ".join(second.problems)
    if second.max_model_len < first.max_model_len or (
        second.max_concurrency < first.max_concurrency
    ):
        return False, (
            f"a second engine would get {second.max_model_len} tokens of context for "
            f"{second.max_concurrency} sequences, less than the serving engine's "
            f"{first.max_model_len} for {first.max_concurrency}"
        )
    if mode == "auto" and second.device.kind != "gpu":
        return False, "updates.swap is auto, which swaps beside on a GPU only"
    return True, (
        f"a second engine of {second.predicted_bytes / GiB:.2f} GiB fits in the "
        f"{second.available_bytes / GiB:.2f} GiB the serving engine leaves"
    )


def staging_verdict(
    enabled: bool, weight_bytes: int, staged_bytes: int, available_bytes: int, reserve_bytes: int
) -> tuple[bool, str]:
    """Whether an in-place update may stage the candidate and the serving weights in host
    memory (two copies of the weights; sets staged already are reused), with the reason."""
    if not enabled:
        return False, "updates.stage_in_host_memory is off"
    needed = max(0, 2 * weight_bytes - staged_bytes)
    if needed + reserve_bytes > available_bytes:
        return False, (
            f"staging needs {needed / GiB:.2f} GiB more host memory (two copies of the weights) "
            f"and {reserve_bytes / GiB:.2f} GiB kept free; {available_bytes / GiB:.2f} GiB is "
            "available: the weights are reloaded from disk inside the pause instead"
        )
    return True, (
        f"staged copy: 2 x {weight_bytes / GiB:.2f} GiB of host memory "
        f"({available_bytes / GiB:.2f} GiB available)"
    )
