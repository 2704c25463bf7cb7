"""OpenAI request bodies (pydantic) and their mapping onto the core's `GenerationRequest`, so
that the HTTP API is checked by exactly the rules gRPC requests are (`server/requests.py`).

Unknown fields are refused (`extra="forbid"`), the ones OpenAI has and edgeagent does not
(`tools`, `logit_bias`, ...) with a message that says so; nothing is silently ignored."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeagent.errors import InvalidRequestError
from edgeagent.server.core import (
    ChatMessage,
    GenerationRequest,
    PromptInput,
    RequestedConstraint,
    Sampling,
    Stopping,
    TokenOptions,
)

# Fields of OpenAI's or vLLM's API that edgeagent does not implement: refused by name.
UNSUPPORTED = frozenset({
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias",
    "audio", "modalities", "prediction", "service_tier", "store", "metadata", "reasoning_effort",
    "web_search_options", "suffix", "echo", "best_of", "response_format.structural_tag",
})  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchema(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # parsed; the output always follows the schema


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra: one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """The fields chat and completions share, vLLM's extras included."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    priority: int | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def to_generation_request(self) -> GenerationRequest:
        sampling, stopping, token_options = _sampling(self), _stopping(self), self.token_options()
        constraint = self._constraint()
        return GenerationRequest(
            self.prompt_input(), sampling, stopping, token_options, constraint, n=self.n,
            priority=self.priority or 0,
        )  # fmt: skip

    def prompt_input(self) -> PromptInput:
        raise NotImplementedError

    def token_options(self) -> TokenOptions:
        raise NotImplementedError

    def limit(self) -> int | None:
        return self.max_tokens

    def _constraint(self) -> RequestedConstraint | None:
        found = [c for c in (_from_format(self.response_format), _from_structured(
            self.structured_outputs), _from_guided(self)) if c is not None]  # fmt: skip
        if len(found) > 1:
            raise InvalidRequestError(
                "response_format", "give one of response_format, structured_outputs and the "
                "guided_* fields, not several"
            )  # fmt: skip
        return found[0] if found else None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def prompt_input(self) -> PromptInput:
        return PromptInput(chat=tuple(ChatMessage(m.role, m.text()) for m in self.messages))

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else (
            self.max_tokens)  # fmt: skip

    def token_options(self) -> TokenOptions:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        if not self.logprobs:
            return TokenOptions()
        return TokenOptions(generated_tokens=True, top_n_tokens=self.top_logprobs or 0)


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = None

    def prompt_input(self) -> PromptInput:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise InvalidRequestError("prompt", f"one prompt per request; got {len(prompts)}")
        return PromptInput(prompt=prompts[0])

    def token_options(self) -> TokenOptions:
        if self.logprobs is None:
            return TokenOptions()
        if self.logprobs < 0:
            raise InvalidRequestError("logprobs", f"must be >= 0; got {self.logprobs}")
        return TokenOptions(generated_tokens=True, top_n_tokens=self.logprobs)


def _sampling(body: _Common) -> Sampling:
    return Sampling(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        repetition_penalty=body.repetition_penalty, min_p=body.min_p,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
    )  # fmt: skip


def _stopping(body: _Common) -> Stopping:
    stop = body.stop if body.stop is not None else ()
    return Stopping(
        max_tokens=body.limit(),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        min_tokens=body.min_tokens or 0,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_sequence=bool(body.include_stop_str_in_output),
        ignore_eos=bool(body.ignore_eos),
    )


def _schema(schema: dict[str, Any] | str) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _from_format(fmt: ResponseFormat | None) -> RequestedConstraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return RequestedConstraint(json_object=True)
    if fmt.json_schema is None:
        raise InvalidRequestError("response_format.json_schema", "is required for json_schema")
    return RequestedConstraint(json_schema=_schema(fmt.json_schema.schema_))


def _from_structured(outputs: StructuredOutputs | None) -> RequestedConstraint | None:
    if outputs is None:
        return None
    given = outputs.model_dump(exclude_none=True)
    if len(given) != 1:
        raise InvalidRequestError(
            "structured_outputs", "give exactly one of json, regex, choice, grammar, json_object"
        )
    return _one(
        "structured_outputs", outputs.json_, outputs.regex, outputs.choice, outputs.grammar,
        outputs.json_object,
    )  # fmt: skip


def _from_guided(body: _Common) -> RequestedConstraint | None:
    values = (body.guided_json, body.guided_regex, body.guided_choice, body.guided_grammar)
    if all(value is None for value in values):
        return None
    if sum(value is not None for value in values) > 1:
        raise InvalidRequestError("guided_json", "give one guided_* field, not several")
    return _one("guided", *values, None)


def _one(field: str, schema: dict[str, Any] | str | None, regex: str | None,
         choice: list[str] | None, grammar: str | None,
         json_object: bool | None) -> RequestedConstraint:  # fmt: skip
    if schema is not None:
        return RequestedConstraint(json_schema=_schema(schema))
    if regex is not None:
        return RequestedConstraint(regex=regex)
    if choice is not None:
        return RequestedConstraint(choice=tuple(choice))
    if grammar is not None:
        return RequestedConstraint(grammar=grammar)
    if json_object:
        return RequestedConstraint(json_object=True)
    raise InvalidRequestError(field, "json_object must be true when given alone")


# The shared checks' field names (gRPC's), as the OpenAI API calls them.
PARAM_NAMES = (
    ("chat.messages", "messages"), ("stopping.max_tokens", "max_tokens"),
    ("stopping.stop_token_ids", "stop_token_ids"), ("stopping.stop", "stop"),
    ("stopping.min_tokens", "min_tokens"), ("sampling.", ""),
    ("response.top_n_tokens", "top_logprobs"), ("constraint", "response_format"),
)  # fmt: skip


def openai_param(field: str) -> str:
    for grpc_name, openai_name in PARAM_NAMES:
        if field.startswith(grpc_name):
            return openai_name + field[len(grpc_name) :]
    return field
