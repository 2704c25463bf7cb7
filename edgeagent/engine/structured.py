"""A request's constraint as vLLM's `StructuredOutputsParams`, with JSON whitespace bounded.

The trap (vLLM #38696, xgrammar #212): a JSON grammar allows any amount of whitespace between
tokens, and a model can loop on spaces or newlines until max_tokens, leaving truncated JSON.
vLLM does not pass xgrammar's `max_whitespace_cnt` through (#54497), and its per-request
whitespace options do nothing (#19945). So for the xgrammar backend (and "auto", which tries
xgrammar first) a JSON constraint is compiled here into xgrammar's EBNF with whitespace runs
bounded, and sent to vLLM as a grammar. A schema xgrammar cannot compile goes to vLLM as a
schema (under "auto" vLLM then picks guidance), told to allow no free whitespace.

A second trap, in xgrammar 0.2.7-0.2.8 (mlc-ai/xgrammar#800): a string with maxLength compiles
to a character class that admits raw control characters, which JSON forbids, so a model can
produce output that no JSON parser accepts. The class is replaced by the one xgrammar uses for
other strings (no escapes are possible in such strings either way).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from edgeagent.engine.interface import Constraint, EngineConfig

logger = logging.getLogger(__name__)

OBJECT_SCHEMA = '{"type": "object"}'
BOUNDED_STRING_CHARACTER = r"[^\"\\\r\n]"  # as xgrammar writes it for maxLength strings
JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\\r\n]"  # as it writes it for other strings


def structured_outputs(constraint: Constraint | None, config: EngineConfig) -> Any:
    """vLLM's structured-output parameters for `constraint` (None: unconstrained). May take a
    while for a large schema: call it off the event loop."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    schema = OBJECT_SCHEMA if constraint.json_object else constraint.json_schema
    if schema is not None:
        grammar = _bounded_json_grammar(schema, config)
        if grammar is not None:
            return StructuredOutputsParams(grammar=grammar)
        return StructuredOutputsParams(json=_without_free_whitespace(schema))
    return StructuredOutputsParams(
        regex=constraint.regex,
        choice=list(constraint.choice) if constraint.choice is not None else None,
        grammar=constraint.grammar,
    )


def _bounded_json_grammar(schema: str, config: EngineConfig) -> str | None:
    """xgrammar's EBNF for `schema` with at most `config.json_max_whitespace` whitespace
    characters in a row, or None where xgrammar is not the backend or cannot compile it."""
    if config.structured_output_backend not in ("auto", "xgrammar"):
        return None
    return _xgrammar_ebnf(schema, config.json_max_whitespace)


@functools.lru_cache(maxsize=256)  # apps send the same few schemas again and again
def _xgrammar_ebnf(schema: str, max_whitespace: int) -> str | None:
    import xgrammar

    try:
        grammar = xgrammar.Grammar.from_json_schema(
            schema, any_whitespace=True, max_whitespace_cnt=max_whitespace
        )
    except Exception as error:  # xgrammar raises RuntimeError and others for what it lacks
        logger.debug("xgrammar cannot compile the schema (%s); vLLM will choose", error)
        return None
    return str(grammar).replace(BOUNDED_STRING_CHARACTER, JSON_STRING_CHARACTER)


def _without_free_whitespace(schema: str) -> str:
    """`schema` with llguidance's own switch for compact JSON (guidance-ai/llguidance
    docs/json_schema.md); the other backends ignore the extra key."""
    document = json.loads(schema)
    if isinstance(document, dict):
        document.setdefault("x-guidance", {}).setdefault("whitespace_flexible", False)
    return json.dumps(document)
