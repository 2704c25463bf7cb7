"""The generation API's features on the real CPU engine: structured output, sampling and
stopping fields, n > 1, token details, Tokenize/Detokenize, time limits, priority, queue limits,
server info and usage. Every constrained output is parsed and checked against its constraint."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from conftest import TEST_CONTEXT, TEST_LIMITS, wait_until_engine_idle
from waits import until

from edgeagent.engine.slot import ServingSlot
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.store.manifest import Manifest
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

Stub = pb_grpc.GenerationServiceStub
PROMPTS = ["Describe a person:", "The river runs", "JSON please:", "Numbers:"]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "role": {"enum": ["reader", "writer", "owner"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "admin", "role", "tags"],
    "additionalProperties": False,
}
TREE = {  # recursive: a node holds nodes
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
            },
            "required": ["id", "kids"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


def request(prompt: str, max_tokens: int = 64, **fields: Any) -> pb.GenerateRequest:
    message = pb.GenerateRequest(prompt=prompt, **fields)
    message.stopping.max_tokens = max_tokens
    if not message.sampling.HasField("temperature"):
        message.sampling.temperature = 0
    return message


def constrained(prompt: str, max_tokens: int = 200, **constraint: Any) -> pb.GenerateRequest:
    return request(prompt, max_tokens, constraint=pb.Constraint(**constraint))


async def invalid(stub: Stub, message: pb.GenerateRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details() or ""


# Structured output


async def test_json_schema_outputs_validate(stub: Stub) -> None:
    for prompt in PROMPTS:
        response = await stub.Generate(constrained(prompt, json_schema=json.dumps(PERSON)))
        assert response.finish_reason == pb.FINISH_REASON_EOS_TOKEN, response
        jsonschema.validate(json.loads(response.text), PERSON)
        assert not re.search(r"\s{5,}", response.text), "whitespace runs are bounded (4)"


@pytest.mark.parametrize("backend", ["auto", "xgrammar"])
def test_the_json_grammar_bounds_whitespace_and_refuses_control_characters(backend: str) -> None:
    """What the engine sends vLLM for a schema, checked with xgrammar's own matcher: runs of
    whitespace are bounded and bounded-length strings hold no raw control character (both
    traps make outputs no JSON parser accepts)."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from edgeagent.engine.interface import Constraint, EngineConfig
    from edgeagent.engine.structured import structured_outputs

    config = EngineConfig(Path("."), 0, 1, structured_output_backend=backend)
    params = structured_outputs(Constraint(json_schema=json.dumps(PERSON)), config)
    grammar = xgrammar.Grammar.from_ebnf(params.grammar)
    good = '{"name": "ada", "age": 36, "admin": true, "role": "owner", "tags": ["x"]}'
    assert accepts(grammar, good)
    assert not accepts(grammar, good.replace('"ada"', '"a\x12a"'))
    assert accepts(grammar, good.replace(": 36", ":    36"))
    assert not accepts(grammar, good.replace(": 36", ":     36"))


def test_other_backends_get_the_schema_itself() -> None:
    from edgeagent.engine.interface import Constraint, EngineConfig
    from edgeagent.engine.structured import structured_outputs

    config = EngineConfig(Path("."), 0, 1, structured_output_backend="guidance")
    params = structured_outputs(Constraint(json_schema=json.dumps(PERSON)), config)
    assert json.loads(params.json)["x-guidance"] == {"whitespace_flexible": False}
    assert params.grammar is None


async def test_a_recursive_schema_ends_valid_or_at_max_tokens(stub: Stub) -> None:
    """A random model may nest for ever; it must end, valid JSON or cut by max_tokens."""
    for prompt in PROMPTS:
        response = await stub.Generate(constrained(prompt, json_schema=json.dumps(TREE)))
        if response.finish_reason == pb.FINISH_REASON_EOS_TOKEN:
            jsonschema.validate(json.loads(response.text), TREE)
        else:
            assert response.finish_reason == pb.FINISH_REASON_MAX_TOKENS
            assert response.text.startswith("{")
            assert response.completion_tokens == 200


async def test_json_object_and_the_empty_schema_give_objects(stub: Stub) -> None:
    for message in (constrained("Data:", json_object=True), constrained("Data:", json_schema="{}")):
        response = await stub.Generate(message)
        if response.finish_reason == pb.FINISH_REASON_EOS_TOKEN:
            assert isinstance(json.loads(response.text), dict)
        else:  # any object may be longer than max_tokens: what came is still an object's start
            assert response.finish_reason == pb.FINISH_REASON_MAX_TOKENS
            assert response.text.lstrip().startswith("{")


async def test_regex_choice_and_grammar_are_followed(stub: Stub) -> None:
    pattern = r"[a-z]{2,5}-[0-9]{3}"
    choices = ["yes", "no", "maybe later"]
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    for prompt in PROMPTS:
        text = (await stub.Generate(constrained(prompt, regex=pattern))).text
        assert re.fullmatch(pattern, text), text
        choice = pb.Choices(choices=choices)
        assert (await stub.Generate(constrained(prompt, choice=choice))).text in choices
        text = (await stub.Generate(constrained(prompt, max_tokens=60, grammar=grammar))).text
        assert re.fullmatch(r"\((?:[1-9][0-9]?\+)*[1-9][0-9]?\)", text) or text.startswith("("), (
            text
        )


async def test_max_tokens_before_the_json_closes_says_length(stub: Stub) -> None:
    response = await stub.Generate(
        constrained("Data:", max_tokens=3, json_schema=json.dumps(PERSON))
    )
    assert response.finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert response.completion_tokens == 3
    assert response.text.startswith("{")


async def test_bad_constraints_are_refused_naming_the_problem(stub: Stub) -> None:
    details = await invalid(stub, constrained("x", json_schema="{not json"))
    assert "constraint.json_schema: not JSON" in details
    details = await invalid(stub, constrained("x", json_schema='{"type": "strnig"}'))
    assert "not a valid JSON Schema" in details
    deep = '{"items":' * 40 + "{}" + "}" * 40
    assert "nested" in await invalid(stub, constrained("x", json_schema=deep))
    big = json.dumps({"enum": ["x" * 100] * (TEST_LIMITS.max_constraint_bytes // 100)})
    assert "max_constraint_bytes" in await invalid(stub, constrained("x", json_schema=big))
    assert "constraint" in await invalid(stub, constrained("x", regex="(unclosed"))
    assert "constraint" in await invalid(stub, constrained("x", grammar="root ::= ("))
    assert "choices" in await invalid(stub, constrained("x", choice=pb.Choices()))
    assert "json_object" in await invalid(stub, constrained("x", json_object=False))


async def test_the_engine_serves_on_after_refused_constraints(
    stub: Stub, engine: VllmEngine, slot: ServingSlot
) -> None:
    await test_bad_constraints_are_refused_naming_the_problem(stub)
    response = await stub.Generate(request("Still there?", 8))
    assert response.completion_tokens == 8
    await wait_until_engine_idle(engine, slot)


# Sampling and stopping


async def greedy(
    stub: Stub, prompt: str, max_tokens: int = 24, **fields: Any
) -> pb.GenerateResponse:
    message = request(prompt, max_tokens, response=pb.ResponseOptions(generated_tokens=True))
    for name, value in fields.items():
        target = message.stopping if hasattr(message.stopping, name) else message.sampling
        if isinstance(value, list):
            getattr(target, name).extend(value)
        else:
            setattr(target, name, value)
    return await stub.Generate(message)


async def test_penalties_change_a_greedy_answer(stub: Stub) -> None:
    plain = (await greedy(stub, "Numbers:", 48)).text
    for penalty in ({"repetition_penalty": 1.8}, {"presence_penalty": 1.5},
                    {"frequency_penalty": 1.5}):  # fmt: skip
        assert (await greedy(stub, "Numbers:", 48, **penalty)).text != plain, penalty


async def test_min_p_of_one_samples_only_the_most_likely_token(stub: Stub) -> None:
    plain = (await greedy(stub, "The river runs", 32)).text
    sampled = await greedy(stub, "The river runs", 32, temperature=1.0, seed=7, min_p=1.0)
    free = await greedy(stub, "The river runs", 32, temperature=1.0, seed=7)
    assert sampled.text == plain != free.text


async def test_stop_token_ids_min_tokens_and_include_stop(stub: Stub) -> None:
    tokens = (await greedy(stub, "The river runs", 24)).tokens
    stop_id = tokens[3].id
    first = next(i for i, t in enumerate(tokens) if t.id == stop_id)
    stopped = await greedy(stub, "The river runs", 24, stop_token_ids=[stop_id])
    assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert [t.id for t in stopped.tokens] == [t.id for t in tokens[: first + 1]]
    later = await greedy(stub, "The river runs", 24, stop_token_ids=[stop_id], min_tokens=first + 2)
    assert later.completion_tokens > first + 1
    text = (await greedy(stub, "The river runs", 24)).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    kept = await greedy(stub, "The river runs", 24, stop=[stop], include_stop_sequence=True)
    assert kept.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert kept.text.endswith(stop)
    cut = await greedy(stub, "The river runs", 24, stop=[stop])
    assert kept.text == cut.text + stop


async def test_ignore_eos_reaches_vllm() -> None:
    """A random model all but never samples end-of-sequence, so this is checked where the
    engine builds vLLM's own SamplingParams."""
    from edgeagent.engine.interface import SamplingOptions
    from edgeagent.engine.vllm_engine import _sampling_params

    params = _sampling_params(SamplingOptions(max_tokens=8, ignore_eos=True, min_tokens=2), None)
    assert params.ignore_eos
    assert params.min_tokens == 2


async def test_n_completions_each_with_an_index(stub: Stub) -> None:
    message = request("Tell me", 12, n=3)
    message.sampling.temperature, message.sampling.seed = 1.0, 11
    response = await stub.Generate(message)
    assert [c.index for c in response.completions] == [0, 1, 2]
    assert len({c.text for c in response.completions}) == 3
    assert response.text == response.completions[0].text
    ended: dict[int, int] = {}
    texts = ["", "", ""]
    async for chunk in stub.GenerateStream(message):
        texts[chunk.index] += chunk.text
        if chunk.finish_reason != pb.FINISH_REASON_NOT_FINISHED:
            ended[chunk.index] = chunk.finish_reason
    assert sorted(ended) == [0, 1, 2]
    assert texts == [c.text for c in response.completions]  # the same seed, the same answers


# Token details


async def test_logprobs_of_generated_and_prompt_tokens(stub: Stub) -> None:
    options = pb.ResponseOptions(generated_tokens=True, input_tokens=True, top_n_tokens=3)
    response = await stub.Generate(request("The river runs", 12, response=options))
    assert len(response.tokens) == response.completion_tokens == 12
    # A special token (random weights emit them at times) keeps its name in its token's text,
    # as vLLM's own server gives it, but the completion's text leaves it out.
    spoken = [t for t in response.tokens if not (t.text.startswith("<|") and t.text.endswith("|>"))]
    assert "".join(t.text for t in spoken) == response.text
    for token in response.tokens:  # greedy: the chosen token is a most likely one
        assert token.logprob <= 0
        assert len(token.top_tokens) == 3
        logprobs = [t.logprob for t in token.top_tokens]
        assert logprobs == sorted(logprobs, reverse=True)
        assert token.logprob == logprobs[0]
        assert token.id in [t.id for t in token.top_tokens if t.logprob == token.logprob]
        # Random weights in half precision tie at the top at times: tied tokens take
        # consecutive ranks in the engine's order, not always the chosen one first.
        tied = logprobs.count(token.logprob)
        assert token.rank >= 1
        if tied < len(logprobs):  # else more may tie beyond the top 3
            assert token.rank <= tied
    prompt_ids = (await stub.Tokenize(pb.TokenizeRequest(prompt="The river runs"))).token_ids
    assert [t.id for t in response.input_tokens] == list(prompt_ids)
    assert not response.input_tokens[0].HasField("logprob")
    assert all(t.HasField("logprob") for t in response.input_tokens[1:])
    too_many = pb.ResponseOptions(
        generated_tokens=True, top_n_tokens=TEST_LIMITS.max_top_n_tokens + 1
    )
    assert "top_n_tokens" in await invalid(stub, request("x", 4, response=too_many))


async def test_tokenize_counts_as_generate_does_and_detokenize_inverts_it(stub: Stub) -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi<|im_end|>there")])
    tokenized = await stub.Tokenize(pb.TokenizeRequest(chat=chat, return_tokens=True))
    generated = await stub.Generate(pb.GenerateRequest(chat=chat, stopping={"max_tokens": 2}))
    assert tokenized.token_count == generated.prompt_tokens == len(tokenized.token_ids)
    assert list(tokenized.tokens).count("<|im_end|>") == 1  # the template's, not the user's
    text = "The river runs under seven bridges."
    ids = (await stub.Tokenize(pb.TokenizeRequest(prompt=text))).token_ids
    assert (await stub.Detokenize(pb.DetokenizeRequest(token_ids=ids))).text == text
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Detokenize(pb.DetokenizeRequest(token_ids=[10**6]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# Time limits, priority, queue limits


LONG = {"max_tokens": TEST_CONTEXT - 64, "ignore_eos": True}


async def test_a_time_limit_ends_the_request_in_the_engine(
    stub: Stub, engine: VllmEngine, slot: ServingSlot
) -> None:
    message = pb.GenerateRequest(prompt="Go on", stopping={**LONG, "time_limit_ms": 300})
    response = await stub.Generate(message)
    assert response.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert 0 < response.completion_tokens < LONG["max_tokens"]
    # Ended at its limit, not long after: within 1.2 s, or ten of this run's decode steps where
    # a step is slower than that (the limit is a timer on the event loop, which a step can hold).
    usage = response.usage
    step_ms = (usage.total_time_ms - usage.time_to_first_token_ms) / max(
        1, response.completion_tokens - 1
    )
    assert 250 < usage.total_time_ms < 300 + max(1200, 10 * step_ms), (usage, step_ms)
    await wait_until_engine_idle(engine, slot)
    by_deadline = await stub.Generate(
        pb.GenerateRequest(prompt="Go on", stopping=LONG), timeout=0.5
    )
    assert by_deadline.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    await wait_until_engine_idle(engine, slot)


async def _fill_the_batch(stub: Stub, engine: VllmEngine) -> list[asyncio.Task[Any]]:
    """One long request per engine slot, each 24 tokens longer than the one before."""

    async def block(i: int) -> pb.GenerateResponse:
        stopping = {"max_tokens": 96 + 24 * i, "ignore_eos": True}
        return await stub.Generate(pb.GenerateRequest(prompt=f"Block {i}", stopping=stopping))

    blockers = [asyncio.create_task(block(i)) for i in range(engine.facts.max_num_seqs)]
    await until(
        "a full batch", lambda: engine.load().running == engine.facts.max_num_seqs, every_s=0.02
    )
    return blockers


async def test_priority_orders_the_engine_queue(stub: Stub, engine: VllmEngine) -> None:
    blockers = await _fill_the_batch(stub, engine)
    order: list[str] = []

    async def ask(name: str, priority: int) -> None:
        message = request(f"Priority {name}", 4, priority=priority)
        async for chunk in stub.GenerateStream(message):
            if chunk.completion_tokens == 1:
                order.append(name)

    low = asyncio.create_task(ask("low", 5))
    await until("low queued in the engine", lambda: engine.load().waiting == 1, every_s=0.01)
    high = asyncio.create_task(ask("high", -5))
    await asyncio.gather(low, high, *blockers)
    assert order == ["high", "low"]


async def test_max_queue_ms_refuses_rather_than_waits(stub: Stub, engine: VllmEngine) -> None:
    blockers = await _fill_the_batch(stub, engine)
    call = stub.Generate(request("Waiting", 4, max_queue_ms=200))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_ms" in (caught.value.details() or "")
    hints = dict(await call.trailing_metadata() or ())
    assert float(hints["retry-after-ms"]) > 0
    await asyncio.gather(*blockers)


# Server info and usage


async def test_server_info_tells_the_engine_load_and_limits(
    stub: Stub, engine: VllmEngine, tiny_4bit: Manifest
) -> None:
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.model.version == tiny_4bit.version
    assert info.serving_digest == tiny_4bit.digest
    assert info.serving_digest.startswith(tiny_4bit.version)
    assert info.engine.scheduling_policy == "priority"
    assert info.engine.structured_output_backend == "auto"
    assert info.engine.vllm_version
    assert info.engine.prefix_caching
    assert info.engine.kv_cache_bytes == engine.config.kv_cache_bytes
    assert info.limits.max_top_n_tokens == TEST_LIMITS.max_top_n_tokens
    assert info.limits.max_constraint_bytes == TEST_LIMITS.max_constraint_bytes
    assert (info.load.running, info.load.waiting) == (0, 0)


async def test_usage_reports_prefix_cache_hits_and_times(stub: Stub) -> None:
    prompt = "A long shared preamble for the prefix cache. " * 12
    first = await stub.Generate(request(prompt + "One", 4))
    second = await stub.Generate(request(prompt + "Two", 4))
    assert first.usage.cached_prompt_tokens < second.usage.cached_prompt_tokens
    assert second.usage.cached_prompt_tokens >= 16
    assert 0 < second.usage.time_to_first_token_ms <= second.usage.total_time_ms
    last = [m async for m in stub.GenerateStream(request(prompt + "Three", 4))][-1]
    assert last.usage.total_time_ms > 0
    assert last.usage.cached_prompt_tokens >= 16
