"""Every new request field is checked before the engine sees it, and refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeagent.engine.interface import Constraint, EngineConfig
from edgeagent.errors import InvalidRequestError
from edgeagent.server.core import GenerationRequest, PromptInput, Sampling, Stopping, TokenOptions
from edgeagent.server.grpc_mapping import generation_request
from edgeagent.server.requests import prepare_request
from edgeagent.settings import LimitSettings
from edgeagent.v1 import generation_pb2 as pb
from fast.fakes import Behaviour, FakeEngine

LIMITS = LimitSettings(max_constraint_bytes=1024, max_top_n_tokens=3, max_n=4)


def engine(policy: str = "fcfs") -> FakeEngine:
    return FakeEngine(EngineConfig(Path("."), 0, 4, 256, scheduling_policy=policy), Behaviour())


def prepare(policy: str = "fcfs", deadline_s: float | None = None, **fields: Any) -> Any:
    request = generation_request(pb.GenerateRequest(prompt="hello", **fields))
    return prepare_request(request, engine(policy), LIMITS, deadline_s)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"sampling": {"min_p": 1.5}}, "sampling.min_p"),
        ({"sampling": {"repetition_penalty": 0.0}}, "sampling.repetition_penalty"),
        ({"sampling": {"presence_penalty": -2.5}}, "sampling.presence_penalty"),
        ({"sampling": {"frequency_penalty": float("nan")}}, "sampling.frequency_penalty"),
        ({"stopping": {"max_tokens": 4, "min_tokens": 5}}, "stopping.min_tokens"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"priority": 1}, "model.scheduling_policy"),
        ({"response": {"generated_tokens": True, "top_n_tokens": 4}}, "response.top_n_tokens"),
        ({"constraint": {"json_schema": "{"}}, "constraint.json_schema: not JSON"),
        ({"constraint": {"json_schema": "[1]"}}, "constraint.json_schema"),
        ({"constraint": {"json_schema": '{"minimum": "zero"}'}}, "not a valid JSON Schema"),
        ({"constraint": {"json_schema": '{"items":' * 33 + "{}" + "}" * 33}}, "nested"),
        ({"constraint": {"json_schema": "[" * 5000 + "]" * 5000}}, "constraint.json_schema"),
        ({"constraint": {"regex": "a" * 1025}}, "limits.max_constraint_bytes"),
        ({"constraint": {"regex": "a\0b"}}, "NUL"),
        ({"constraint": {"grammar": ""}}, "constraint.grammar"),
        ({"constraint": {"json_object": False}}, "constraint.json_object"),
        ({"constraint": {"choice": {"choices": []}}}, "constraint.choice.choices"),
        ({"constraint": {"choice": {"choices": ["a", ""]}}}, "constraint.choice.choices[1]"),
        ({"stopping": {"ignore_eos": True}, "constraint": {"regex": "a+"}}, "stopping.ignore_eos"),
    ],
)
def test_bad_fields_are_refused_by_name(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidRequestError, match=named.replace("[", r"\[").replace("]", r"\]")):
        prepare(**fields)


def test_fields_reach_the_engine_options() -> None:
    options = prepare(
        "priority",
        sampling={"min_p": 0.2, "repetition_penalty": 1.3, "presence_penalty": 0.5,
                  "frequency_penalty": -0.5},
        stopping={"max_tokens": 9, "min_tokens": 2, "stop_token_ids": [7, 8],
                  "include_stop_sequence": True, "ignore_eos": True},
        response={"generated_tokens": True, "input_tokens": True, "top_n_tokens": 2},
        n=3, priority=-4,
    ).options  # fmt: skip
    assert (options.min_p, options.repetition_penalty) == pytest.approx((0.2, 1.3))
    assert (options.presence_penalty, options.frequency_penalty) == (0.5, -0.5)
    assert (options.max_tokens, options.min_tokens, options.stop_token_ids) == (9, 2, (7, 8))
    assert options.include_stop_sequence
    assert options.ignore_eos
    assert (options.logprobs, options.prompt_logprobs) == (2, 2)
    assert (options.n, options.priority) == (3, -4)
    assert prepare(constraint={"regex": "[ab]+"}).options.constraint == Constraint(regex="[ab]+")


@pytest.mark.parametrize("schema", [{}, {"title": "anything"}, True])
def test_a_schema_that_constrains_nothing_is_taken_as_json_object(schema: object) -> None:
    constraint = prepare(constraint={"json_schema": json.dumps(schema)}).options.constraint
    assert constraint == Constraint(json_object=True)


def test_time_limits_come_from_the_request_and_the_deadline() -> None:
    assert prepare(stopping={"time_limit_ms": 1500}).time_limit_s == 1.5
    assert prepare(stopping={"time_limit_ms": 1500}, deadline_s=1.0).time_limit_s == 0.95
    assert prepare(deadline_s=0.01).time_limit_s == 0.0
    assert prepare().time_limit_s is None
    assert prepare(max_queue_ms=250).max_queue_s == 0.25


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (GenerationRequest(PromptInput("hi"), n=-1), "n"),
        (GenerationRequest(PromptInput("hi"), stopping=Stopping(min_tokens=-1)),
         "stopping.min_tokens"),
        (GenerationRequest(PromptInput("hi"), stopping=Stopping(stop_token_ids=(1, -2))),
         "stopping.stop_token_ids[1]"),
        (GenerationRequest(PromptInput("hi"), sampling=Sampling(seed=-1)), "sampling.seed"),
        (GenerationRequest(PromptInput("hi"), sampling=Sampling(seed=2**64)), "sampling.seed"),
        (GenerationRequest(PromptInput("hi"), token_options=TokenOptions(top_n_tokens=-1)),
         "response.top_n_tokens"),
        (GenerationRequest(PromptInput("hi"), priority=2**31), "priority"),
        (GenerationRequest(PromptInput()), "input"),
        (GenerationRequest(PromptInput("")), "prompt"),
        (GenerationRequest(PromptInput(chat=())), "chat.messages"),
    ],
)  # fmt: skip
def test_values_outside_the_api_types_are_refused_by_name(
    request_: GenerationRequest, named: str
) -> None:
    """gRPC's types bound these as a message is parsed; the checks hold them for the core's
    request type, which the OpenAI API builds from JSON numbers."""
    with pytest.raises(InvalidRequestError) as refused:
        prepare_request(request_, engine(), LIMITS)
    assert refused.value.field == named
