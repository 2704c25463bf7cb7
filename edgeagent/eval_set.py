"""The eval set: the held-out exchanges the update gate and `edgeagent eval` score.

The demo's generated chat exchanges (`demo/dataset.py`) are split into training and held-out by
a hash of the user's message; the held-out ones are never trained on. Rendered in Phi-4's chat
template they suit any Phi-4-family version, the demo's or the hub's: `held_out_set` is what
perplexity, agreement and KL are computed on, `task_exchanges` the questions whose answers are
checked exactly (sums and JSON extraction).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeagent.demo.dataset import TASKS, Exchange, exchanges

EVAL_PROMPTS = 32  # small enough for the update gate's few seconds on a CPU


@dataclass(frozen=True)
class EvalSet:
    name: str
    texts: tuple[str, ...]


def held_out_exchanges() -> list[Exchange]:
    """Generated like the training exchanges, never trained on."""
    return [e for e in exchanges() if e.held_out]


def held_out_set(prompts: int = EVAL_PROMPTS) -> EvalSet:
    """The held-out exchanges rendered in Phi-4's chat template: the first `prompts`, spread
    over the tasks by taking every n-th."""
    held_out = held_out_exchanges()
    step = max(1, len(held_out) // prompts)
    chosen = held_out[::step][:prompts]
    return EvalSet(f"edgeagent held-out ({len(chosen)} exchanges)",
                   tuple(e.render() for e in chosen))  # fmt: skip


def task_exchanges(per_task: int | None = None) -> list[Exchange]:
    """The held-out exchanges whose answers are checked exactly (sums and JSON extraction), all
    of them or `per_task` of each task spread over its list."""
    held_out = held_out_exchanges()
    chosen: list[Exchange] = []
    for task in TASKS:
        of_task = [e for e in held_out if e.task == task]
        step = max(1, len(of_task) // per_task) if per_task else 1
        chosen += of_task[::step][:per_task]
    return chosen
