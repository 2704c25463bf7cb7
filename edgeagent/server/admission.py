"""Who gets in: the bounds that keep a flood from queueing without end.

A request is let into the engine only while the requests beyond the engine's batch (those that
would wait in its queue) stay within `limits.max_waiting_requests`, and the prompt tokens of
everything under way stay within `limits.max_queued_prompt_tokens`; a single prompt may not be
longer than `limits.max_prompt_tokens`. Beyond a bound the answer is RESOURCE_EXHAUSTED with a
hint of when to retry (from how long requests have been taking), never an ever longer wait.
Both the gRPC service and any other front end admit through here.
"""

from __future__ import annotations

from edgeagent.engine.slot import Lease, ServingSlot
from edgeagent.errors import ResourceExhaustedError
from edgeagent.metrics import Metrics
from edgeagent.settings import LimitSettings

MIN_HINT_S, MAX_HINT_S = 0.1, 30.0
SMOOTHING = 0.2  # weight of the newest request duration in the moving average


class Admission:
    def __init__(self, slot: ServingSlot, limits: LimitSettings, metrics: Metrics) -> None:
        self._slot, self._limits, self._metrics = slot, limits, metrics
        self._typical_s = 1.0  # a moving average of request durations

    def admit(self, lease: Lease, prompt_tokens: int) -> None:
        """Let the leased request in, or raise ResourceExhaustedError."""
        limits, slot = self._limits, self._slot
        if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            self._refuse("prompt_too_long")
            raise ResourceExhaustedError(
                f"prompt: {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}"
            )
        batch = lease.serving.engine.facts.max_num_seqs
        waiting = len(slot) - batch  # this request counts: it is under way already
        if waiting > limits.max_waiting_requests:
            self._refuse("queue_full")
            raise ResourceExhaustedError(
                f"{waiting - 1} request(s) already wait for the engine (the limit is "
                f"{limits.max_waiting_requests}); retry later",
                self._retry_hint_s(waiting - limits.max_waiting_requests, batch),
            )
        queued = slot.prompt_tokens_under_way + prompt_tokens
        if queued > limits.max_queued_prompt_tokens:
            self._refuse("too_many_tokens")
            raise ResourceExhaustedError(
                f"{queued - prompt_tokens} prompt tokens are already under way; with these "
                f"{prompt_tokens} that passes the limit of {limits.max_queued_prompt_tokens}",
                self._retry_hint_s(1, batch),
            )
        slot.note_prompt(lease.request_id, prompt_tokens)

    def queue_timeout(self, waited_s: float, batch: int) -> ResourceExhaustedError:
        """The refusal of a request that waited its `max_queue_ms` without a first token."""
        self._refuse("queue_timeout")
        return ResourceExhaustedError(
            f"no first token within max_queue_ms ({waited_s * 1000:.0f} ms): the engine is "
            f"busy; retry later", self._retry_hint_s(1, batch),
        )  # fmt: skip

    def finished(self, duration_s: float) -> None:
        """A request ended after `duration_s`: what the retry hints are made of."""
        self._typical_s += SMOOTHING * (duration_s - self._typical_s)

    def _retry_hint_s(self, excess: int, batch: int) -> float:
        """Roughly when `excess` requests' worth of room frees up."""
        hint = self._typical_s * max(1.0, excess / max(batch, 1))
        return min(MAX_HINT_S, max(MIN_HINT_S, hint))

    def _refuse(self, reason: str) -> None:
        self._metrics.refused.labels(reason).inc()
