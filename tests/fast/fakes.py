"""The fast tier's stand-ins: a fake engine with the real one's interface, fake model versions
that the real store commits, and a fake GPU.

A fake version is a real model directory (config.json, a safetensors file whose header the fit
check reads, possibly sparse) plus `fake-engine.json`, the behaviour of any fake engine that
loads it: its text, its speed, and its failures. The behaviour travels with the version's bytes
through the store, so an in-process daemon and a daemon in a child process script alike.

The fake engine is deterministic: at temperature 0 (or with a seed) the same version answers
the same prompt with the same words, and another version with other words.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import struct
import time
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
from edgeagent.engine.vllm_engine import choose_quantized_kernel
from edgeagent.errors import EngineDeadError, EngineError, InvalidRequestError
from edgeagent.gpu import DeviceMemory

BEHAVIOUR_FILE = "fake-engine.json"
GiB = 1 << 30
WORDS = (
    "river", "lamp", "orbit", "cedar", "pixel", "harbor", "quartz", "meadow", "signal", "ember",
    "delta", "fable", "granite", "lumen", "mosaic", "nectar", "opal", "prism", "saffron", "tundra",
)  # fmt: skip


STAGED_BYTES = 4096  # what a fake engine reports for each staged set


@dataclass(frozen=True)
class Behaviour:
    """How a fake engine on a version behaves. Seconds are wall-clock sleeps."""

    seed: int = 0  # which words it says: another seed, another model
    token_s: float = 0.0  # per generated token
    start_s: float = 0.0
    start_error: str | None = None  # starting an engine on this version raises
    fail_starts_after: int | None = None  # starts beyond this many (in one process) raise
    reload_s: float = 0.0
    reload_error: str | None = None  # reloading this version into an engine raises
    reload_kills_engine: bool = False  # ... and the engine is dead afterwards
    stream_error: str | None = None  # every generation raises (the smoke test fails)
    # Issue 26's hang: reloading this version returns, then the engine never answers again
    # (every generation and reload waits for ever) while its health check still passes.
    hang_after_reload: bool = False
    stream_hangs: bool = False  # every generation on this version never yields a token
    dies_in_stream: bool = False  # a generation kills the engine; its stream goes silent
    logprob: float = -0.5  # NaN or inf: the smoke test finds non-finite output
    prompt_logprob: float = -1.0  # each prompt token's: what the quality gate's perplexity reads

    @classmethod
    def read(cls, model_dir: Path) -> Behaviour:
        path = model_dir / BEHAVIOUR_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        if isinstance(data.get("logprob"), str):
            data["logprob"] = float(data["logprob"])
        return cls(**data)

    def write(self, model_dir: Path) -> None:
        data: dict[str, Any] = asdict(self)
        if not math.isfinite(self.logprob):
            data["logprob"] = str(self.logprob)
        (model_dir / BEHAVIOUR_FILE).write_text(json.dumps(data, sort_keys=True))


def make_fake_model(
    out: Path, behaviour: Behaviour = Behaviour(), *, quantized: bool = True,
    weight_bytes: int = 4096, **config_changes: Any,
) -> Path:  # fmt: skip
    """A model directory the store accepts: Phi-3 config (with `config_changes`), one
    safetensors file with `weight_bytes` of tensor data, the fake behaviour. `quantized`: a
    GPTQ 4-bit layout, else fp16 (another layout: an update to it restarts the engine)."""
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_hidden_layers": 4,
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1280, "max_position_embeddings": 4096,
        "torch_dtype": "float16", "tie_word_embeddings": False, **config_changes,
    }  # fmt: skip
    if quantized:
        config["quantization_config"] = {
            "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
        }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    _write_safetensors(out / "model.safetensors", weight_bytes)
    behaviour.write(out)
    return out


def _write_safetensors(path: Path, data_bytes: int) -> None:
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [data_bytes], "data_offsets": [0, data_bytes]}}
    ).encode()
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(header)) + header)
        file.truncate(8 + len(header) + data_bytes)


class FakeProbe:
    """A 24 GiB GPU with 20 GiB free."""

    def __init__(self, total_gib: float = 24, free_gib: float = 20) -> None:
        self.total, self.free = int(total_gib * GiB), int(free_gib * GiB)

    def read(self) -> DeviceMemory:
        return DeviceMemory("gpu", "fake GPU", self.total, self.free)


@dataclass
class FakeEngines:
    """The engine factory: starts fake engines as the version's behaviour says, and keeps them
    for the test to look at (and kill)."""

    started: list[FakeEngine] = field(default_factory=list)
    starts: Counter[Path] = field(default_factory=Counter)

    def __call__(self, config: EngineConfig) -> FakeEngine:
        model = config.model_path.resolve()  # the version behind the daemon's stable link
        behaviour = Behaviour.read(model)
        self.starts[model] += 1
        time.sleep(behaviour.start_s)
        if behaviour.start_error is not None:
            raise RuntimeError(behaviour.start_error)
        limit = behaviour.fail_starts_after
        if limit is not None and self.starts[model] > limit:
            raise RuntimeError(f"start {self.starts[model]} on this version fails")
        engine = FakeEngine(config, behaviour)
        self.started.append(engine)
        return engine

    @property
    def live(self) -> list[FakeEngine]:
        return [engine for engine in self.started if not engine.closed]


class FakeEngine:
    """The real engine's interface over words chosen by a hash: no model, no vLLM."""

    def __init__(self, config: EngineConfig, behaviour: Behaviour) -> None:
        self.config, self.behaviour = config, behaviour
        kernel, _ = choose_quantized_kernel(config.quantized_kernel, config.reloads_in_place,
                                            hopper=True)  # the fake GPU is a Hopper  # fmt: skip
        self.facts = ModelFacts(config.model_path, config.max_model_len or 4096,
                                config.max_num_seqs, "Phi3ForCausalLM", "fake", 256,
                                quantized_kernel=kernel)  # fmt: skip
        self.closed = self.dead = self.wedged = False
        self.running: set[str] = set()
        self._aborted: set[str] = set()
        self.reloads: list[Path] = []  # every change of weights: reloaded or copied in
        self.copies_in: list[Path] = []  # those copied in from staged host memory
        self.weights_path = config.model_path.resolve()
        self.staged: dict[str, tuple[Path, Behaviour]] = {}

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        turns = "".join(f"<|im_start|>{m.role}<|im_sep|>{m.content}<|im_end|>" for m in messages)
        return self.encode(turns + "<|im_start|>assistant<|im_sep|>")

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        for position, token in enumerate(token_ids):
            if not 0 <= token < self.facts.vocab_size:
                raise InvalidRequestError(f"token_ids[{position}]", f"{token} is not a token id")
        return bytes(token_ids).decode(errors="replace")

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        return [self.decode([token]) for token in token_ids]

    async def stream(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncGenerator[Delta, None]:
        """Words chosen by a hash, one per step for each of the request's n completions."""
        self._check_alive()
        if self.behaviour.stream_error is not None:
            raise EngineError(self.behaviour.stream_error)
        if self.behaviour.dies_in_stream:
            self.dead = True
        if self.wedged or self.behaviour.stream_hangs or self.behaviour.dies_in_stream:
            await _forever()
        self.running.add(request_id)
        try:
            texts = [""] * options.n
            unfinished = set(range(options.n))
            room = self.facts.max_model_len - len(prompt_token_ids)
            prompt_details = self._prompt_details(prompt_token_ids, options)
            for step in range(min(options.max_tokens, room)):
                await asyncio.sleep(self.behaviour.token_s)
                self._check_alive()
                if request_id in self._aborted:
                    for index in sorted(unfinished):
                        yield Delta("", step, FinishReason.CANCELLED, index=index)
                    return
                for index in sorted(unfinished):
                    piece = " " + self._word(prompt_token_ids, step, options, index)
                    texts[index] += piece
                    stop = next((s for s in options.stop if s in texts[index]), None)
                    finish = self._finish(step + 1, options, room, stop)
                    yield Delta(piece, step + 1, finish, stop, self._details(piece, options),
                                index, prompt_details)  # fmt: skip
                    prompt_details = ()
                    if finish is not None:
                        unfinished.discard(index)
                if not unfinished:
                    return
        finally:
            self.running.discard(request_id)
            self._aborted.discard(request_id)

    def _details(self, piece: str, options: SamplingOptions) -> tuple[TokenDetail, ...]:
        """A word is one token here: its first byte is its id."""
        if options.logprobs is None:
            return ()
        top = tuple(TopToken(ord(piece[1]) + i, piece, self.behaviour.logprob)
                    for i in range(options.logprobs))  # fmt: skip
        return (TokenDetail(ord(piece[1]), piece, self.behaviour.logprob, 1, top),)

    def _prompt_details(
        self, prompt_token_ids: list[int], options: SamplingOptions
    ) -> tuple[TokenDetail, ...]:
        if options.prompt_logprobs is None:
            return ()
        texts = self.token_texts(prompt_token_ids)
        first = (TokenDetail(prompt_token_ids[0], texts[0]),)
        pairs = zip(prompt_token_ids[1:], texts[1:], strict=True)
        logprob = self.behaviour.prompt_logprob
        rest = tuple(TokenDetail(token, text, logprob, 1) for token, text in pairs)
        return first + rest

    def _word(
        self, prompt: list[int], index: int, options: SamplingOptions, completion: int = 0
    ) -> str:
        key = f"{self.behaviour.seed}|{prompt[-16:]}|{index}"
        if completion:
            key += f"|n{completion}"
        if options.temperature > 0:
            key += f"|{options.seed if options.seed is not None else time.monotonic_ns()}"
        digest = hashlib.sha256(key.encode()).digest()
        return WORDS[digest[0] % len(WORDS)]

    @staticmethod
    def _finish(
        tokens: int, options: SamplingOptions, room: int, stop: str | None
    ) -> FinishReason | None:
        if stop is not None:
            return FinishReason.STOP_SEQUENCE
        if tokens >= room:
            return FinishReason.TOKEN_LIMIT
        if tokens >= options.max_tokens:
            return FinishReason.MAX_TOKENS
        return None

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self._aborted.add(request_id)

    async def check_health(self) -> None:
        self._check_alive()

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self.running))

    async def reload_weights(self, weights_path: Path) -> None:
        self._check_alive()
        if self.wedged:
            await _forever()
        behaviour = Behaviour.read(weights_path)
        await asyncio.sleep(behaviour.reload_s)
        self.reloads.append(weights_path)
        self.weights_path = weights_path
        if behaviour.reload_error is not None:
            self.dead = behaviour.reload_kills_engine
            raise EngineError(behaviour.reload_error)
        self.behaviour = behaviour
        self.wedged = behaviour.hang_after_reload

    async def stage_weights(self, key: str, weights_path: Path | None) -> int:
        """As the real engine stages: a version whose reload fails cannot be staged either
        (its processing is what fails), and the engine goes on serving."""
        self._check_alive()
        path = weights_path or self.weights_path
        behaviour = Behaviour.read(path) if weights_path is not None else self.behaviour
        if behaviour.reload_error is not None:
            raise EngineError(f"staging: {behaviour.reload_error}")
        self.staged[key] = (path, behaviour)
        return STAGED_BYTES

    async def swap_in_staged(self, key: str) -> None:
        self._check_alive()
        if self.wedged:
            await _forever()
        path, behaviour = self.staged[key]
        await asyncio.sleep(behaviour.reload_s)  # what the copy takes, as the reload's time
        self.reloads.append(path)
        self.copies_in.append(path)
        self.weights_path, self.behaviour = path, behaviour
        self.wedged = behaviour.hang_after_reload

    async def keep_staged(self, keys: Sequence[str]) -> dict[str, int]:
        self._check_alive()
        self.staged = {k: v for k, v in self.staged.items() if k in keys}
        return dict.fromkeys(self.staged, STAGED_BYTES)

    def shutdown(self) -> None:
        self.closed = True

    def kill(self) -> None:
        """What SIGKILL of a real engine's core process looks like from the daemon."""
        self.dead = True

    def _check_alive(self) -> None:
        if self.closed:
            raise EngineDeadError("this engine was shut down")
        if self.dead:
            raise EngineDeadError("the engine core process died")


async def _forever() -> None:
    """What awaiting an engine that will never answer looks like (cancellation ends it)."""
    await asyncio.Event().wait()


def expected_words(behaviour_seed: int, prompt: str, count: int) -> str:
    """What a fake engine of `behaviour_seed` answers to `prompt` at temperature 0."""
    engine = FakeEngine(EngineConfig(Path("."), 0, 1, 4096), Behaviour(seed=behaviour_seed))
    options = SamplingOptions(max_tokens=count, temperature=0)
    ids = engine.encode(prompt)
    return "".join(" " + engine._word(ids, index, options) for index in range(count))
