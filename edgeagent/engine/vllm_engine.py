"""A narrow async wrapper over vLLM's `AsyncLLM`: start, stream, abort, health, reload, shutdown.

It knows nothing of the artifact store, the fit check or gRPC: it takes a model directory and
sizes, token ids and sampling options, and yields text deltas with token counts.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from edgeagent.engine import orphans
from edgeagent.engine.interface import (
    ChatMessage,
    Delta,
    EngineConfig,
    EngineLoad,
    FinishReason,
    ModelFacts,
    SamplingOptions,
)
from edgeagent.errors import EngineDeadError, EngineError, InvalidRequestError

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "edgeagent.engine.worker.WorkerExtension"
PLACEHOLDER = "\ue000"  # a private-use character: no template or tokenizer gives it meaning


class VllmEngine:
    """The real engine: vLLM's `AsyncLLM` in this process, its engine core in a child process."""

    def __init__(self, llm: Any, facts: ModelFacts, stats: _LatestStats | None = None) -> None:
        self._llm_or_none: Any = llm
        self._stats = stats or _LatestStats()
        self._tokenizer = llm.get_tokenizer()
        self.facts = facts

    @classmethod
    def start(cls, config: EngineConfig) -> VllmEngine:
        """Start vLLM on `config.model_path` (blocks: tens of seconds; longer with a cold cache)."""
        if not (config.model_path / "config.json").is_file():
            raise EngineError(f"no model at {config.model_path} (config.json missing)")
        # vLLM reports usage statistics to its authors' server unless told not to; an edge box
        # sends nothing anywhere it was not configured to (an operator may still opt in).
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        orphans.mark_daemon()
        stats = _LatestStats()
        return cls._launch(_engine_args(config), config, stats)

    @classmethod
    def _launch(cls, args: Any, config: EngineConfig, stats: _LatestStats) -> VllmEngine:
        """The engine itself. Its own frame: vLLM's first import happened in `_engine_args`,
        whose frames some library keeps in a stored traceback; the `AsyncLLM` must not be a
        local of any of them, or it outlives its shutdown until interpreter exit."""
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.perf_counter()
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[stats.logger_factory()])
        model_config = llm.model_config
        facts = ModelFacts(
            path=config.model_path,
            max_model_len=int(model_config.max_model_len),
            max_num_seqs=config.max_num_seqs,
            architecture=(model_config.architectures or ["unknown"])[0],
            quantization=str(model_config.quantization or "none"),
        )
        logger.info("engine started in %.1f s: %s", time.perf_counter() - started, facts)
        return cls(llm, facts, stats)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The template is rendered around placeholders; its own text is encoded with special
        tokens as control tokens, each message's content as plain text."""
        marks = [f"{PLACEHOLDER}{index}{PLACEHOLDER}" for index in range(len(messages))]
        conversation = [
            {"role": m.role, "content": mark} for m, mark in zip(messages, marks, strict=True)
        ]
        rendered: str = self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        ids, position = list[int](), 0
        for mark, message in zip(marks, messages, strict=True):
            found = rendered.find(mark, position)
            if found < 0:
                raise InvalidRequestError(
                    "chat.messages", "the model's chat template changes message contents; "
                    "send a raw prompt instead"
                )  # fmt: skip
            ids += self.encode(rendered[position:found]) + self._encode_text(message.content)
            position = found + len(mark)
        return ids + self.encode(rendered[position:])

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer.encode(
            text, add_special_tokens=False, split_special_tokens=True
        )
        return ids

    async def stream(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        """Yield deltas until the request finishes. Closing the iterator aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:  # vLLM's own checks of the options: the request's fault, said as such
            params = SamplingParams(
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k,
                seed=options.seed,
                stop=list(options.stop) or None,
                logprobs=0 if options.logprobs else None,  # 0: only the sampled token's
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as error:
            raise InvalidRequestError("sampling", str(error)) from None
        completion_tokens = 0
        prompt = {"prompt_token_ids": prompt_token_ids}
        try:
            async for output in self._llm.generate(prompt, params, request_id):
                completion = output.outputs[0]
                completion_tokens += len(completion.token_ids)
                finish = None
                if output.finished:
                    total = len(prompt_token_ids) + completion_tokens
                    finish = self._finish_reason(completion, total)
                stop = completion.stop_reason if isinstance(completion.stop_reason, str) else None
                logprobs = _sampled_logprobs(completion) if options.logprobs else ()
                yield Delta(completion.text, completion_tokens, finish, stop, logprobs)
        except VllmEngineDeadError as exc:
            raise EngineDeadError(f"the engine died: {exc}") from exc

    def _finish_reason(self, completion: Any, total_tokens: int) -> FinishReason:
        reason = completion.finish_reason
        if reason == "length":
            at_limit = total_tokens >= self.facts.max_model_len
            return FinishReason.TOKEN_LIMIT if at_limit else FinishReason.MAX_TOKENS
        if reason == "stop":
            if isinstance(completion.stop_reason, str):
                return FinishReason.STOP_SEQUENCE
            return FinishReason.EOS_TOKEN
        return FinishReason.CANCELLED

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineDeadError(f"the engine is not healthy: {exc}") from exc

    def num_unfinished_requests(self) -> int:
        count: int = self._llm.get_num_unfinished_requests()
        return count

    def load(self) -> EngineLoad:
        return self._stats.latest

    async def reload_weights(self, weights_path: Path) -> None:
        """Swap in the weights at `weights_path` (same architecture and layout) in place.

        Call with no request running. Nothing computed by the old weights survives: the prefix
        cache is dropped and the KV cache zeroed; the allocator's cache of the old weights goes
        back to the device.
        """
        started = time.perf_counter()
        await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_path)})
        loaded = time.perf_counter()
        if not await self._llm.reset_prefix_cache():
            raise EngineError("could not drop the prefix cache: requests are still running")
        await self._llm.collective_rpc("clear_kv_cache")
        cleared = time.perf_counter()
        reserved = await self._llm.collective_rpc("release_cached_memory")
        released = time.perf_counter()
        logger.info(
            "weights reloaded from %s in %.2f s (load %.2f s, caches cleared %.3f s, allocator "
            "released %.3f s); %.2f GiB reserved by the allocator",
            weights_path, released - started, loaded - started, cleared - loaded,
            released - cleared, sum(reserved) / (1 << 30),
        )  # fmt: skip

    @property
    def _llm(self) -> Any:
        if self._llm_or_none is None:
            raise EngineDeadError("this engine was shut down")
        return self._llm_or_none

    def shutdown(self) -> None:
        """Stop the engine and its processes; returns once they have exited (on a GPU, their
        memory is free for the next engine). A second call does nothing."""
        llm, self._llm_or_none = self._llm_or_none, None
        if llm is None:
            return
        llm.shutdown()
        multiprocessing.active_children()  # reaps them: vLLM may kill one without waiting
        # AsyncLLM.__del__ shuts down again; let it run now, while vLLM's modules are whole,
        # not at interpreter exit (where it fails with "'NoneType' object is not callable").
        del llm
        gc.collect()


class _LatestStats:
    """The engine's scheduler statistics as of its last step, through vLLM's stat-logger
    interface (a logger that keeps the latest numbers instead of printing them)."""

    def __init__(self) -> None:
        self.latest = EngineLoad()

    def logger_factory(self) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class KeepLatest(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any,
                       **kwargs: Any) -> None:  # fmt: skip
                if scheduler_stats is not None:
                    stats.latest = EngineLoad(
                        running=int(scheduler_stats.num_running_reqs),
                        waiting=int(scheduler_stats.num_waiting_reqs),
                        kv_cache_usage=float(scheduler_stats.kv_cache_usage),
                    )

            def log_engine_initialized(self) -> None:
                pass

        return KeepLatest


def _engine_args(config: EngineConfig) -> Any:
    """vLLM's engine arguments for `config` (the first import of vLLM happens here)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine import async_llm  # noqa: F401  # loaded here, not in _launch's frame

    args = AsyncEngineArgs(
        model=str(config.model_path),
        dtype=config.dtype,  # type: ignore[arg-type]  # checked by Settings
        kv_cache_memory_bytes=config.kv_cache_bytes,
        max_num_seqs=config.max_num_seqs,
        enforce_eager=config.enforce_eager,
        disable_log_stats=True,
        worker_extension_cls=WORKER_EXTENSION,
    )
    if config.max_model_len is not None:
        args.max_model_len = config.max_model_len
    if config.max_num_batched_tokens is not None:
        args.max_num_batched_tokens = config.max_num_batched_tokens
    if config.gpu_memory_utilization is not None:
        args.gpu_memory_utilization = config.gpu_memory_utilization
    return args


def _sampled_logprobs(completion: Any) -> tuple[float, ...]:
    """The log-probability vLLM gave each sampled token of this delta."""
    entries = completion.logprobs or []
    return tuple(
        float(entry[token].logprob)
        for token, entry in zip(completion.token_ids, entries, strict=False)
    )
