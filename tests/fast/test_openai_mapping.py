"""OpenAI bodies map onto the core's `GenerationRequest` field by field; conflicting constraints and
unsupported combinations are refused by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgeagent.errors import (
    InvalidRequestError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from edgeagent.server.core import ChatMessage, GenerationRequest, RequestedConstraint, TokenOptions
from edgeagent.server.error_codes import http_error_for
from edgeagent.server.openai.errors import error_body
from edgeagent.server.openai.requests import ChatRequest, CompletionRequest, openai_param

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def chat(**fields: Any) -> GenerationRequest:
    return ChatRequest.model_validate({"messages": USER, **fields}).to_generation_request()


def test_sampling_stopping_and_response_fields() -> None:
    request = chat(max_tokens=5, max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3,
                   stop="END", n=2, logprobs=True, top_logprobs=3, presence_penalty=0.1,
                   top_k=4, min_p=0.2, priority=1, min_tokens=2, ignore_eos=True)  # fmt: skip
    assert request.stopping.max_tokens == 7  # max_completion_tokens wins
    assert list(request.stopping.stop) == ["END"]
    assert request.stopping.min_tokens == 2
    assert request.stopping.ignore_eos
    assert request.sampling.temperature == 0.5
    assert request.sampling.seed == 3
    assert request.sampling.top_k == 4
    assert request.sampling.presence_penalty == pytest.approx(0.1)
    assert request.sampling.frequency_penalty is None
    assert request.n == 2
    assert request.priority == 1
    assert request.token_options == TokenOptions(generated_tokens=True, top_n_tokens=3)
    assert request.input.chat == (ChatMessage(role="user", content="hi"),)


def test_text_parts_are_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = chat(messages=[{"role": "user", "content": parts}])
    assert request.input.chat is not None
    assert request.input.chat[0].content == "ab"


@pytest.mark.parametrize(
    ("fields", "constraint"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
         RequestedConstraint(json_schema=json.dumps(SCHEMA))),
        ({"response_format": {"type": "json_object"}}, RequestedConstraint(json_object=True)),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_regex": "a+"}, RequestedConstraint(regex="a+")),
        ({"guided_choice": ["x", "y"]}, RequestedConstraint(choice=("x", "y"))),
        ({"guided_json": SCHEMA}, RequestedConstraint(json_schema=json.dumps(SCHEMA))),
        ({"structured_outputs": {"grammar": "root ::= \"a\""}},
         RequestedConstraint(grammar='root ::= "a"')),
        ({"structured_outputs": {"json_object": True}}, RequestedConstraint(json_object=True)),
    ],
)  # fmt: skip
def test_constraints(fields: dict[str, Any], constraint: RequestedConstraint | None) -> None:
    assert chat(**fields).constraint == constraint


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_json"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format"),
        ({"structured_outputs": {"regex": "a", "grammar": "b"}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_refused_combinations(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        chat(**fields)
    assert refused.value.field == field


def test_completions_take_one_prompt_and_integer_logprobs() -> None:
    request = CompletionRequest(prompt=["x"], logprobs=2).to_generation_request()
    assert request.input.prompt == "x"
    assert request.token_options.top_n_tokens == 2
    with pytest.raises(InvalidRequestError, match="one prompt per request"):
        CompletionRequest(prompt=["x", "y"]).to_generation_request()


def test_grpc_field_names_become_openai_names() -> None:
    assert openai_param("chat.messages[2].role") == "messages[2].role"
    assert openai_param("sampling.top_p") == "top_p"
    assert openai_param("stopping.max_tokens") == "max_tokens"
    assert openai_param("constraint.regex") == "response_format.regex"


@pytest.mark.parametrize(
    ("error", "status", "kind", "headers"),
    [
        (InvalidRequestError("stopping.stop", "bad"), 400, "invalid_request_error", {}),
        (ResourceExhaustedError("busy", retry_after_s=2.2), 429, "rate_limit_error",
         {"Retry-After": "3"}),
        (ResourceExhaustedError("busy", retry_after_s=0.01), 429, "rate_limit_error",
         {"Retry-After": "1"}),
        # too big as it is: OpenAI's clients would retry a rate_limit_error
        (ResourceExhaustedError("too big as it is"), 413, "invalid_request_error", {}),
        (UnavailableError("draining"), 503, "service_unavailable_error", {}),
        (UnauthenticatedError("no token"), 401, "authentication_error", {}),
        (NotFoundError("no such model"), 404, "not_found_error", {}),
        (RuntimeError("a bug"), 500, "internal_server_error", {}),
    ],
)  # fmt: skip
def test_http_statuses_come_from_the_same_table_as_grpc_codes(
    error: Exception, status: int, kind: str, headers: dict[str, str]
) -> None:
    mapped = http_error_for(error)
    assert (mapped.status, mapped.type, mapped.headers) == (status, kind, headers)
    body = error_body(mapped)["error"]
    assert isinstance(body, dict)
    if isinstance(error, InvalidRequestError):
        assert body["param"] == "stop"
        assert body["message"] == "stop: bad"
    if status == 500:
        assert "a bug" not in body["message"]
