"""A request's `constraint`, checked before vLLM compiles it into a grammar.

vLLM's structured-output backends check a constraint only when the request reaches the engine,
some not at all (a grammar that fails to compile ends the request with an error after it was
admitted), and compile time grows fast with a schema's nesting. So the cheap checks run here:
size, nesting, JSON syntax and the JSON Schema meta-schema, each refused with INVALID_ARGUMENT
naming the field. What only the backend can judge (a regex or grammar's syntax, a schema
feature it does not support) it judges, and the engine says so in the same terms.
"""

from __future__ import annotations

import functools
import json

import jsonschema

from edgeagent.engine.interface import Constraint
from edgeagent.errors import InvalidRequestError
from edgeagent.server.core import RequestedConstraint
from edgeagent.settings import LimitSettings

# Keywords that describe a schema without constraining its instances.
ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "examples", "default", "$defs"}
)
MAX_SCHEMA_DEPTH = 32  # JSON nesting of the schema document; vLLM itself refuses beyond 64


def constraint_from(
    request: RequestedConstraint | None, limits: LimitSettings
) -> Constraint | None:
    """The engine's constraint for the request's `constraint`, or None when it has none."""
    given = request.given if request is not None else []
    if request is None or not given:
        return None
    if len(given) > 1:
        raise InvalidRequestError("constraint", f"give one kind, not {', '.join(given)}")
    if request.json_schema is not None:
        return _json_schema(request.json_schema, limits)
    if request.json_object is not None:
        if not request.json_object:
            raise InvalidRequestError(
                "constraint.json_object", "set it to true, or send no constraint"
            )
        return Constraint(json_object=True)
    if request.regex is not None:
        return Constraint(regex=_text("constraint.regex", request.regex, limits))
    if request.grammar is not None:
        return Constraint(grammar=_text("constraint.grammar", request.grammar, limits))
    assert request.choice is not None  # the one kind left
    return Constraint(choice=_choices(request.choice, limits))


def _text(field: str, text: str, limits: LimitSettings) -> str:
    if not text:
        raise InvalidRequestError(field, "must not be empty")
    if "\0" in text:
        raise InvalidRequestError(field, "must not contain NUL characters")
    _check_size(field, len(text.encode()), limits)
    return text


def _check_size(field: str, size: int, limits: LimitSettings) -> None:
    if size > limits.max_constraint_bytes:
        raise InvalidRequestError(
            field, f"{size} bytes; the limit is {limits.max_constraint_bytes} bytes "
            f"(limits.max_constraint_bytes)"
        )  # fmt: skip


def _choices(choices: tuple[str, ...], limits: LimitSettings) -> tuple[str, ...]:
    field = "constraint.choice.choices"
    if not choices:
        raise InvalidRequestError(field, "must hold at least one string")
    if len(choices) > limits.max_choices:
        raise InvalidRequestError(
            field, f"{len(choices)} choices; the limit is {limits.max_choices}"
        )
    for index, choice in enumerate(choices):
        if not choice:
            raise InvalidRequestError(f"{field}[{index}]", "must not be empty")
    _check_size(field, sum(len(c.encode()) for c in choices), limits)
    return choices


def _json_schema(text: str, limits: LimitSettings) -> Constraint:
    _text("constraint.json_schema", text, limits)
    return _checked_schema(text)


@functools.lru_cache(maxsize=256)  # apps send the same few schemas; checking one takes ~2 ms
def _checked_schema(text: str) -> Constraint:
    field = "constraint.json_schema"
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(field, f"not JSON: {error}") from None
    except RecursionError:
        raise InvalidRequestError(field, f"nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    depth = _depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            field, f"nested {depth} levels deep; the limit is {MAX_SCHEMA_DEPTH} (compiling "
            f"deeply nested schemas takes the engine minutes)"
        )  # fmt: skip
    if schema is True or (isinstance(schema, dict) and not set(schema) - ANNOTATIONS):
        return Constraint(json_object=True)  # "any JSON value" lets a model loop forever
    if not isinstance(schema, dict):
        raise InvalidRequestError(field, "must be a JSON object (a schema that admits nothing)")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "the top level"
        raise InvalidRequestError(
            field, f"not a valid JSON Schema at {where}: {error.message}"
        ) from None
    return Constraint(json_schema=text)


def _depth(value: object) -> int:
    """Nesting depth of a JSON value, without recursion (a hostile document may be deep)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest
