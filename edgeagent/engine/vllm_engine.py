"""A narrow async wrapper over vLLM's `AsyncLLM`: start, stream, abort, health, reload, shutdown.

It knows nothing of the artifact store, the fit check or gRPC: it takes a model directory and
sizes, token ids and sampling options, and yields text deltas with token counts.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import multiprocessing
import os
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from edgeagent.engine import cpu_kernels, orphans, worker_forkserver
from edgeagent.engine.core_fork import forked_engine_core
from edgeagent.engine.interface import (
    ChatMessage,
    Delta,
    EngineConfig,
    EngineLoad,
    FinishReason,
    ModelFacts,
    SamplingOptions,
    TokenDetail,
    TopToken,
)
from edgeagent.engine.structured import structured_outputs
from edgeagent.errors import EngineDeadError, EngineError, InvalidRequestError
from edgeagent.timeline import record_step

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "edgeagent.engine.worker.WorkerExtension"
PLACEHOLDER = "\ue000"  # a private-use character: no template or tokenizer gives it meaning


class VllmEngine:
    """The real engine: vLLM's `AsyncLLM` in this process, its engine core in a child process."""

    def __init__(
        self, llm: Any, config: EngineConfig, facts: ModelFacts, stats: _LatestStats | None = None
    ) -> None:
        self._llm_or_none: Any = llm
        self._stats = stats or _LatestStats()
        self._tokenizer = llm.get_tokenizer()
        self.config = config
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
        worker_forkserver.prepare(config.worker_record)  # imports beside this process's, below
        stats = _LatestStats()
        args = _engine_args(config)
        record_step("daemon: imports (vLLM, torch)")
        freeze_import_heap()
        kernel = _set_engine_environment(config)
        return cls._launch(args, config, stats, kernel)

    @classmethod
    def _launch(
        cls, args: Any, config: EngineConfig, stats: _LatestStats, kernel: str
    ) -> VllmEngine:
        """The engine itself. Its own frame: vLLM's first import happened in `_engine_args`,
        whose frames some library keeps in a stored traceback; the `AsyncLLM` must not be a
        local of any of them, or it outlives its shutdown until interpreter exit."""
        from vllm import __version__ as vllm_version
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.perf_counter()
        vllm_config = args.create_engine_config()
        record_step("daemon: vLLM's engine config (platform checks, heap frozen)")
        if current_platform.is_cpu():  # where vLLM's worker is a process of its own
            from vllm.v1.executor import multiproc_executor

            worker_forkserver.install(multiproc_executor)
        with forked_engine_core():
            llm = AsyncLLM.from_vllm_config(  # what from_engine_args passes, from the same args
                vllm_config, stat_loggers=[stats.logger_factory()],
                enable_log_requests=args.enable_log_requests,
                disable_log_stats=args.disable_log_stats,
            )  # fmt: skip
        record_step("daemon: engine core ready, AsyncLLM up")
        model_config = llm.model_config
        facts = ModelFacts(
            path=config.model_path,
            max_model_len=int(model_config.max_model_len),
            max_num_seqs=config.max_num_seqs,
            architecture=(model_config.architectures or ["unknown"])[0],
            quantization=str(model_config.quantization or "none"),
            vocab_size=len(llm.get_tokenizer()),
            prefix_caching=bool(llm.vllm_config.cache_config.enable_prefix_caching),
            vllm_version=vllm_version,
            quantized_kernel=kernel,
        )
        logger.info("engine started in %.1f s: %s", time.perf_counter() - started, facts)
        return cls(llm, config, facts, stats)

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

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self._check_ids(token_ids)
        text: str = self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        self._check_ids(token_ids)
        return [self._tokenizer.decode([token]) for token in token_ids]

    def _check_ids(self, token_ids: Sequence[int]) -> None:
        for position, token in enumerate(token_ids):
            if not 0 <= token < self.facts.vocab_size:
                raise InvalidRequestError(
                    f"token_ids[{position}]",
                    f"{token} is not a token id (the vocabulary has {self.facts.vocab_size})",
                )

    async def stream(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        """Yield deltas (each of one completion: `Delta.index`) until every completion has
        finished. Closing the iterator aborts the request."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        structured = None
        if options.constraint is not None:  # compiling a schema takes a while: off the loop
            structured = await asyncio.to_thread(
                structured_outputs, options.constraint, self.config
            )
        params = _sampling_params(options, structured)
        generated: dict[int, int] = {}  # tokens so far, by completion index
        prompt = {"prompt_token_ids": prompt_token_ids}
        first = True
        try:
            async for output in self._llm.generate(
                prompt, params, request_id, priority=options.priority
            ):
                if first:
                    cached = int(output.num_cached_tokens or 0)
                    prompt_details = self._prompt_details(prompt_token_ids, output, options)
                first = False
                for completion in output.outputs:
                    index = completion.index
                    generated[index] = generated.get(index, 0) + len(completion.token_ids)
                    yield self._delta(completion, generated[index], len(prompt_token_ids),
                                      options, prompt_details, cached)  # fmt: skip
                    prompt_details = ()
        except VllmEngineDeadError as exc:
            raise EngineDeadError(f"the engine died: {exc}") from exc
        except _client_errors() as exc:  # vLLM's own checks: the request's fault, said as such
            field = "constraint" if options.constraint is not None else "request"
            raise InvalidRequestError(field, str(exc)) from None

    def _delta(
        self, completion: Any, generated: int, prompt_tokens: int, options: SamplingOptions,
        prompt_details: tuple[TokenDetail, ...], cached: int,
    ) -> Delta:  # fmt: skip
        finish = None
        if completion.finish_reason is not None:
            finish = self._finish_reason(
                completion, prompt_tokens + generated, options.stop_token_ids
            )
        stop = completion.stop_reason if isinstance(completion.stop_reason, str) else None
        top_n = options.logprobs
        tokens = _generated_details(completion, top_n) if top_n is not None else ()
        return Delta(completion.text, generated, finish, stop, tokens, completion.index,
                     prompt_details, cached)  # fmt: skip

    def _prompt_details(
        self, prompt_token_ids: list[int], output: Any, options: SamplingOptions
    ) -> tuple[TokenDetail, ...]:
        top_n = options.prompt_logprobs
        if top_n is None:
            return ()
        entries = output.prompt_logprobs or [None] * len(prompt_token_ids)
        texts = self.token_texts(prompt_token_ids)
        return tuple(
            _detail(token, text, entry, top_n)
            for token, text, entry in zip(prompt_token_ids, texts, entries, strict=False)
        )

    def _finish_reason(
        self, completion: Any, total_tokens: int, stop_token_ids: tuple[int, ...]
    ) -> FinishReason:
        reason = completion.finish_reason
        if reason == "length":
            at_limit = total_tokens >= self.facts.max_model_len
            return FinishReason.TOKEN_LIMIT if at_limit else FinishReason.MAX_TOKENS
        if reason == "stop":  # stop_reason: a stop string or token id (the model's EOS ids too)
            stop = completion.stop_reason
            if isinstance(stop, str) or (stop is not None and stop in stop_token_ids):
                return FinishReason.STOP_SEQUENCE
            return FinishReason.EOS_TOKEN
        if reason == "error":
            return FinishReason.ERROR
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

    async def quantized_kernels(self) -> list[str]:
        """The 4-bit kernels the model's layers run on, as vLLM chose them (empty when the
        model is not quantized)."""
        per_worker = await self._llm.collective_rpc("quantized_kernels")
        return sorted({name for names in per_worker for name in names})

    async def reload_weights(self, weights_path: Path) -> None:
        """Swap in the weights at `weights_path` (same architecture and layout) in place.

        Call with no request running. Nothing computed by the old weights survives: the prefix
        cache is dropped and the KV cache zeroed; the allocator's cache of the old weights goes
        back to the device.
        """
        started = time.perf_counter()
        await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(weights_path)})
        loaded = time.perf_counter()
        await self._forget_old_computations()
        cleared = time.perf_counter()
        reserved = await self._llm.collective_rpc("release_cached_memory")
        released = time.perf_counter()
        logger.info(
            "weights reloaded from %s in %.2f s (load %.2f s, caches cleared %.3f s, allocator "
            "released %.3f s); %.2f GiB reserved by the allocator",
            weights_path, released - started, loaded - started, cleared - loaded,
            released - cleared, sum(reserved) / (1 << 30),
        )  # fmt: skip

    async def stage_weights(self, key: str, weights_path: Path | None) -> int:
        """Stage `key`'s weights in host memory, in the serving kernels' layout, while the
        engine serves (`staging.py`): from a checkpoint directory, or (None) the weights serving
        now. One decoder layer per call, so decode steps run in between. The bytes staged by
        this call (0: `key` was staged already)."""
        started = time.perf_counter()
        path = str(weights_path) if weights_path is not None else None
        groups = await self._staging_step("begin_staging", key=key, weights_path=path)
        staged = 0
        for index in range(groups):
            staged = await self._staging_step("stage_group", key=key, index=index)
        if groups:
            await self._llm.collective_rpc("release_cached_memory")
            logger.info("%s staged in host memory: %.2f GiB in %d steps, %.2f s", key,
                        staged / (1 << 30), groups, time.perf_counter() - started)  # fmt: skip
        return staged

    async def _staging_step(self, method: str, **kwargs: Any) -> int:
        status, value = _first(await self._llm.collective_rpc(method, kwargs=kwargs))
        if status != "ok":
            raise EngineError(f"staging {kwargs['key']} failed: {value}")
        return int(value)

    async def swap_in_staged(self, key: str) -> None:
        """Copy `key`'s staged weights into the serving tensors (call with no request
        running); as after a reload, nothing computed by the old weights survives."""
        started = time.perf_counter()
        copy_s = _first(await self._llm.collective_rpc("swap_in_staged", kwargs={"key": key}))
        await self._forget_old_computations()
        logger.info("%s copied in from host memory in %.3f s (the copy %.3f s)",
                    key, time.perf_counter() - started, copy_s)  # fmt: skip

    async def keep_staged(self, keys: Sequence[str]) -> dict[str, int]:
        """Drop every staged set but `keys`'; the sets left and their bytes."""
        left = _first(await self._llm.collective_rpc("keep_staged", kwargs={"keys": list(keys)}))
        return dict(left)

    async def _forget_old_computations(self) -> None:
        if not await self._llm.reset_prefix_cache():
            raise EngineError("could not drop the prefix cache: requests are still running")
        await self._llm.collective_rpc("clear_kv_cache")

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
    from vllm.config import StructuredOutputsConfig
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
        scheduling_policy=config.scheduling_policy,  # type: ignore[arg-type]  # checked by Settings
        structured_outputs_config=StructuredOutputsConfig(
            backend=config.structured_output_backend  # type: ignore[arg-type]  # as above
        ),
    )
    if config.max_model_len is not None:
        args.max_model_len = config.max_model_len
    if config.max_num_batched_tokens is not None:
        args.max_num_batched_tokens = config.max_num_batched_tokens
    if config.gpu_memory_utilization is not None:
        args.gpu_memory_utilization = config.gpu_memory_utilization
    if config.kv_cache_dtype != "auto":
        args.kv_cache_dtype = config.kv_cache_dtype  # type: ignore[assignment]  # by Settings
    if config.async_scheduling is not None:
        args.async_scheduling = config.async_scheduling
    if config.speculative is not None:
        args.speculative_config = dict(config.speculative)
    return args


def freeze_import_heap() -> None:
    """Once per process, after vLLM's and torch's imports and before any engine exists: move
    the objects alive now (~620k, nearly all of them from those imports, and they live for
    ever) out of the collector's sight. A full collection walks every tracked object while
    holding the GIL: ~0.4 s in this process on a 2-core box, which every stream felt when the
    collection that frees a swapped-out engine ran (a 0.46 s stall on the event loop); frozen,
    it takes 10 to 30 ms and still frees engines, which are created after the freeze. vLLM's own
    server freezes once it has started (`vllm.utils.gc_utils.freeze_gc_heap`), which here would
    keep every replaced engine for ever. Refcounting still frees frozen objects."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def _set_engine_environment(config: EngineConfig) -> str:
    """What vLLM reads from the environment rather than its arguments; the engine's processes
    inherit it when they start. Returns the quantized kernel chosen ("" off a GPU)."""
    from vllm.platforms import current_platform

    on_gpu = current_platform.is_cuda()
    kernel, why = choose_quantized_kernel(
        config.quantized_kernel, config.reloads_in_place, current_platform.is_device_capability(90)
    )
    _disable_other_kernel(kernel)
    if on_gpu:
        logger.info("4-bit kernel: %s (%s)", kernel, why)
    if current_platform.is_cpu():
        os.environ[cpu_kernels.KERNEL_ENV] = config.cpu_quantized_kernel
        # vLLM 0.32's CPU build saves its AOT compile artifacts but cannot load them back
        # ("'function' object has no attribute 'finalize_loading'"), so every start compiled
        # afresh; its older compile cache loads (tiny model: engine init 26 s cold, 9 s warm
        # against 15 s warm with AOT). GPUs keep AOT, which loads there.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    return kernel if on_gpu else ""


# Measured on an H200 with the Phi-4-shaped 4-bit checkpoint (docs/benchmarks.md, "Engine
# options"): see the table for why "auto" is what it is.
AUTO_QUANTIZED_KERNEL = "marlin"
KERNEL_CLASSES = {"marlin": "MarlinLinearKernel", "machete": "MacheteLinearKernel"}
RELOAD_SAFE_KERNEL = "machete"


def choose_quantized_kernel(setting: str, reloads_in_place: bool, hopper: bool) -> tuple[str, str]:
    """The 4-bit kernel for `model.quantized_kernel` = `setting`, with the reason. `auto` is
    Marlin (the faster), except where updates reload weights in place on a Hopper GPU: a
    reload of Marlin-format weights leaves the engine unable to run its next step (issue 26),
    so Machete there, the one other choice (Hopper only)."""
    if setting != "auto":
        return setting, "model.quantized_kernel"
    if reloads_in_place and hopper:
        return RELOAD_SAFE_KERNEL, (
            "auto, updates reload in place: in-place reloads with Marlin hang the engine "
            "(issue 26); Machete reloads correctly"
        )
    if reloads_in_place:
        return AUTO_QUANTIZED_KERNEL, "auto; Machete, which reloads in place, needs Hopper"
    return AUTO_QUANTIZED_KERNEL, "auto, updates start a new engine: the faster kernel"


def _disable_other_kernel(kernel: str) -> None:
    """vLLM picks the first GPTQ kernel in its list that works on the GPU (Machete on Hopper,
    Marlin elsewhere); disabling the other one picks ours."""
    other = KERNEL_CLASSES["machete" if kernel == "marlin" else "marlin"]
    disabled = [k for k in os.environ.get("VLLM_DISABLED_KERNELS", "").split(",") if k]
    disabled = [k for k in disabled if k not in KERNEL_CLASSES.values()] + [other]
    os.environ["VLLM_DISABLED_KERNELS"] = ",".join(disabled)


@functools.cache
def _client_errors() -> tuple[type[Exception], ...]:
    """vLLM's errors that blame the request: ValueError up to 0.26, VLLMClientError since.
    Asked for on first use: importing vLLM at module import would cost every process that
    merely imports this module (the fake engines' daemons too) seconds of torch import."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def _sampling_params(options: SamplingOptions, structured_outputs: Any) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=options.n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            repetition_penalty=options.repetition_penalty,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            seed=options.seed,
            stop=list(options.stop) or None,
            stop_token_ids=list(options.stop_token_ids) or None,
            include_stop_str_in_output=options.include_stop_sequence,
            min_tokens=options.min_tokens,
            ignore_eos=options.ignore_eos,
            logprobs=options.logprobs,
            prompt_logprobs=options.prompt_logprobs,
            structured_outputs=structured_outputs,
            output_kind=RequestOutputKind.DELTA,
        )
    except _client_errors() as error:
        raise InvalidRequestError("sampling", str(error)) from None


def _generated_details(completion: Any, top_n: int) -> tuple[TokenDetail, ...]:
    """Each token of this delta with its log-probability and the alternatives vLLM gave."""
    entries = completion.logprobs or []
    return tuple(
        _detail(token, None, entry, top_n)
        for token, entry in zip(completion.token_ids, entries, strict=False)
    )


def _detail(token: int, text: str | None, entry: Any, top_n: int) -> TokenDetail:
    """`token` with vLLM's log-probability entry for its position (None: the first prompt
    token, which nothing predicts). The entry holds the `top_n` most likely tokens (ranks 1 to
    top_n) and the token itself, whatever its rank."""
    if entry is None:
        return TokenDetail(int(token), text or "")
    top = tuple(
        TopToken(int(alternative), logprob.decoded_token or "", float(logprob.logprob))
        for alternative, logprob in sorted(entry.items(), key=lambda item: item[1].rank or 0)
        if logprob.rank is not None and logprob.rank <= top_n
    )
    chosen = entry.get(token)
    if chosen is None:
        return TokenDetail(int(token), text or "", top=top)
    rank = int(chosen.rank) if chosen.rank is not None else None
    text = text if text is not None else (chosen.decoded_token or "")
    return TokenDetail(int(token), text, float(chosen.logprob), rank, top)


def _first(per_worker: list[Any]) -> Any:
    """The answer of the first worker (edgeagent's engines have one: no tensor parallelism)."""
    if not per_worker:
        raise EngineError("the engine has no worker to ask")
    return per_worker[0]
