"""The client side of the generation API: `Parameters` becomes the request the proto describes
(each field to its own proto field, unset ones left unset, two constraints refused), the
`edgeagent generate` flags become that request, and the commands read the daemon's answers
(n completions, token details, usage, tokenize, detokenize, server info) against the real
daemon with a fake engine."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
from collections import namedtuple
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgeagent.cli import build_parser, main
from edgeagent.cli.generation import generate_request
from edgeagent.client import Client, Parameters, build_request, describe_rpc_error
from edgeagent.v1 import generation_pb2 as pb
from fast.fakes import Behaviour
from fast.runner import Box, in_process

PROMPT = "The river runs"
SCHEMA = '{"type": "object", "required": ["a"]}'


def _request(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPT, **fields)


# Each Parameters field, a value for it, and the request that value alone makes.
MAPPING: dict[str, tuple[Any, pb.GenerateRequest]] = {
    "max_tokens": (64, _request(stopping=pb.StoppingCriteria(max_tokens=64))),
    "temperature": (0.0, _request(sampling=pb.SamplingParameters(temperature=0.0))),
    "top_p": (0.5, _request(sampling=pb.SamplingParameters(top_p=0.5))),
    "top_k": (7, _request(sampling=pb.SamplingParameters(top_k=7))),
    "seed": (42, _request(sampling=pb.SamplingParameters(seed=42))),
    "stop": (["\n\n", "END"], _request(stopping=pb.StoppingCriteria(stop=["\n\n", "END"]))),
    "repetition_penalty": (
        1.25, _request(sampling=pb.SamplingParameters(repetition_penalty=1.25))
    ),
    "min_p": (0.125, _request(sampling=pb.SamplingParameters(min_p=0.125))),
    "presence_penalty": (-0.5, _request(sampling=pb.SamplingParameters(presence_penalty=-0.5))),
    "frequency_penalty": (1.5, _request(sampling=pb.SamplingParameters(frequency_penalty=1.5))),
    "min_tokens": (3, _request(stopping=pb.StoppingCriteria(min_tokens=3))),
    "time_limit_ms": (2500, _request(stopping=pb.StoppingCriteria(time_limit_ms=2500))),
    "include_stop_sequence": (
        True, _request(stopping=pb.StoppingCriteria(include_stop_sequence=True))
    ),
    "stop_token_ids": (
        (2, 100265), _request(stopping=pb.StoppingCriteria(stop_token_ids=[2, 100265]))
    ),
    "ignore_eos": (True, _request(stopping=pb.StoppingCriteria(ignore_eos=True))),
    "n": (3, _request(n=3)),
    "priority": (-2, _request(priority=-2)),
    "max_queue_ms": (750, _request(max_queue_ms=750)),
    "logprobs": (4, _request(response=pb.ResponseOptions(generated_tokens=True, top_n_tokens=4))),
    "prompt_logprobs": (True, _request(response=pb.ResponseOptions(input_tokens=True))),
    "json_schema": (SCHEMA, _request(constraint=pb.Constraint(json_schema=SCHEMA))),
    "json_object": (True, _request(constraint=pb.Constraint(json_object=True))),
    "regex": ("[0-9]+", _request(constraint=pb.Constraint(regex="[0-9]+"))),
    "choice": (
        ["yes", "no"], _request(constraint=pb.Constraint(choice=pb.Choices(choices=["yes", "no"])))
    ),
    "grammar": ('root ::= "a"', _request(constraint=pb.Constraint(grammar='root ::= "a"'))),
}  # fmt: skip


def test_the_mapping_covers_every_parameter() -> None:
    """A field added to Parameters without a row here fails this test."""
    assert set(MAPPING) == {f.name for f in dataclasses.fields(Parameters) if f.name != "_"}


@pytest.mark.parametrize("name", list(MAPPING))
def test_each_parameter_sets_its_proto_field_and_nothing_else(name: str) -> None:
    value, expected = MAPPING[name]
    request = build_request(PROMPT, params=Parameters(**{name: value}))
    assert request == expected, f"{name}: {request}"
    # The same bytes: no field set to its default where the expected request leaves it unset.
    assert request.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def test_all_parameters_together_make_one_request() -> None:
    everything = {name: value for name, (value, _) in MAPPING.items() if name in _NOT_CONSTRAINTS}
    request = build_request(PROMPT, params=Parameters(**everything, regex="a+"))
    expected = _request(constraint=pb.Constraint(regex="a+"))
    for name in _NOT_CONSTRAINTS:
        expected.MergeFrom(MAPPING[name][1])
    assert request == expected
    assert request.sampling.temperature == 0.0
    assert request.response.generated_tokens
    assert request.response.input_tokens
    assert request.response.top_n_tokens == 4


CONSTRAINTS: dict[str, Any] = {
    "json_schema": "{}", "json_object": True, "regex": "x", "choice": ["a", "b"], "grammar": "g",
}  # fmt: skip
_NOT_CONSTRAINTS = [name for name in MAPPING if name not in CONSTRAINTS]


def test_unset_parameters_leave_the_request_bare() -> None:
    request = build_request(PROMPT)
    assert request.SerializeToString() == pb.GenerateRequest(prompt=PROMPT).SerializeToString()
    for part in ("sampling", "stopping", "response", "constraint", "n", "max_queue_ms"):
        assert not request.HasField(part), part
    chat = build_request(messages=[("system", "Be brief."), ("user", "Hi")])
    assert [(m.role, m.content) for m in chat.chat.messages] == [
        ("system", "Be brief."), ("user", "Hi")
    ]  # fmt: skip


def test_logprobs_zero_asks_for_tokens_without_alternatives() -> None:
    request = build_request(PROMPT, params=Parameters(logprobs=0))
    assert request.HasField("response")
    assert request.response.generated_tokens
    assert request.response.top_n_tokens == 0
    assert not request.response.input_tokens


@pytest.mark.parametrize(("first", "second"), list(itertools.combinations(CONSTRAINTS, 2)))
def test_two_constraints_are_refused_naming_both(first: str, second: str) -> None:
    params = Parameters(**{first: CONSTRAINTS[first], second: CONSTRAINTS[second]})
    with pytest.raises(ValueError, match="at most one constraint") as refused:
        build_request(PROMPT, params=params)
    assert first in str(refused.value)
    assert second in str(refused.value)


def test_a_bare_string_is_not_taken_as_choices() -> None:
    with pytest.raises(TypeError, match="choice"):
        build_request(PROMPT, params=Parameters(choice="yes"))


def test_new_parameters_are_keyword_only_after_the_old_ones() -> None:
    assert Parameters(8, 0.5) == Parameters(max_tokens=8, temperature=0.5)
    with pytest.raises(TypeError):
        Parameters(8, 0.5, 0.9, 4, 1, (), 1.1)  # type: ignore[misc]


# The command line.


def _generate_args(*flags: str) -> pb.GenerateRequest:
    return generate_request(build_parser().parse_args(["generate", PROMPT, *flags]))


def test_generate_flags_make_the_request(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    request = _generate_args(
        "--max-tokens", "32", "--temperature", "0", "--top-p", "0.9", "--top-k", "5",
        "--seed", "7", "--stop", "END", "--stop", "\n", "--min-p", "0.05",
        "--repetition-penalty", "1.1", "--presence-penalty", "0.5",
        "--frequency-penalty", "-0.5", "--min-tokens", "2", "--stop-token-id", "13",
        "--stop-token-id", "100265", "--include-stop", "--ignore-eos", "--time-limit", "1.5",
        "--max-queue", "0.25", "--priority", "-1", "-n", "3", "--logprobs", "2",
        "--prompt-logprobs", "--json-schema", str(schema),
    )  # fmt: skip
    expected = pb.GenerateRequest(
        prompt=PROMPT,
        sampling=pb.SamplingParameters(
            temperature=0, top_p=0.9, top_k=5, seed=7, min_p=0.05, repetition_penalty=1.1,
            presence_penalty=0.5, frequency_penalty=-0.5,
        ),
        stopping=pb.StoppingCriteria(
            max_tokens=32, stop=["END", "\n"], min_tokens=2, stop_token_ids=[13, 100265],
            include_stop_sequence=True, ignore_eos=True, time_limit_ms=1500,
        ),
        response=pb.ResponseOptions(generated_tokens=True, top_n_tokens=2, input_tokens=True),
        constraint=pb.Constraint(json_schema=schema.read_text()),
        n=3, priority=-1, max_queue_ms=250,
    )  # fmt: skip
    assert request == expected


def test_generate_without_flags_sends_a_bare_prompt() -> None:
    assert _generate_args() == pb.GenerateRequest(prompt=PROMPT)
    chat = _generate_args("--system", "Be brief.")
    assert [(m.role, m.content) for m in chat.chat.messages] == [
        ("system", "Be brief."), ("user", PROMPT)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "constraint"),
    [
        pytest.param(["--json-object"], pb.Constraint(json_object=True), id="json-object"),
        pytest.param(["--regex", "[a-z]+"], pb.Constraint(regex="[a-z]+"), id="regex"),
        pytest.param(
            ["--choice", "yes", "--choice", "no"],
            pb.Constraint(choice=pb.Choices(choices=["yes", "no"])),
            id="choice",
        ),
    ],
)
def test_constraint_flags(flags: list[str], constraint: pb.Constraint) -> None:
    assert _generate_args(*flags).constraint == constraint


def test_grammar_is_read_from_its_file(tmp_path: Path) -> None:
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    assert _generate_args("--grammar", str(grammar)).constraint.grammar == grammar.read_text()


def test_logprobs_zero_flag_asks_for_tokens_only() -> None:
    request = _generate_args("--logprobs", "0")
    assert request.response == pb.ResponseOptions(generated_tokens=True)
    assert request.HasField("response")


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        pytest.param(["--json-object", "--regex", "a"], "not allowed with", id="two-constraints"),
        pytest.param(["--choice", "a", "--json-object"], "not allowed with", id="choice-and-json"),
        pytest.param(["--stop-token-id", "-1"], "not a token id", id="negative-token-id"),
        pytest.param(["--logprobs", "-1"], "not a count", id="negative-logprobs"),
        pytest.param(["-n", "x"], "not a count", id="n-not-a-number"),
        pytest.param(["--time-limit", "-1"], "seconds >= 0", id="negative-time"),
        pytest.param(["--max-queue", "soon"], "not a number of seconds", id="not-seconds"),
        pytest.param(["--json-schema", "/nonexistent/s.json"], "cannot read", id="no-schema"),
    ],
)
def test_bad_generate_flags_are_usage_errors(
    flags: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["generate", PROMPT, *flags])
    assert exited.value.code == 2
    assert said in capsys.readouterr().err


Metadatum = namedtuple("Metadatum", ["key", "value"])


class _Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "no first token within max_queue_ms (120 ms)"

    def trailing_metadata(self) -> Any:
        return (Metadatum("retry-after-ms", "250"),)  # as grpc gives it: a (key, value) tuple


def test_a_refusal_for_load_says_when_to_retry() -> None:
    said = describe_rpc_error(_Refused())
    assert said == (
        "RESOURCE_EXHAUSTED: no first token within max_queue_ms (120 ms) (retry after 250 ms)"
    )


# The commands against the real daemon with a fake engine.


async def _run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_n_completions_print_one_after_another_with_token_details(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--max-tokens", "4", "--temperature", "0", "-n", "3"]
    async with in_process(box) as daemon:
        code = await _run("generate", PROMPT, *flags, "--logprobs", "2", "--prompt-logprobs",
                          "--target", daemon.box.target)  # fmt: skip
        out, err = capsys.readouterr()
        with Client(daemon.box.target) as client:
            request = generate_request(build_parser().parse_args(["generate", PROMPT, *flags]))
            unary = await asyncio.to_thread(client.generate_request, request)
    assert code == 0, err
    texts = [completion.text for completion in unary.completions]
    assert len(texts) == 3
    assert out == (
        "=== completion 0 ===\n" + texts[0] + "\n=== completion 1 ===\n" + texts[1]
        + "\n=== completion 2 ===\n" + texts[2]
    )  # fmt: skip
    for index in range(3):
        assert f"--- tokens of completion {index}: id, text, logprob, rank" in err
    assert "--- prompt tokens:" in err
    assert len(re.findall(r"-0\.5000 +#1 \| ", err)) == 3 * 4  # each generated token, its top 2
    assert "3 completions, 12 tokens generated" in err
    assert "0: 4 FINISH_REASON_MAX_TOKENS, 1: 4 FINISH_REASON_MAX_TOKENS" in err
    assert re.search(r"--- server: \d+ cached prompt tokens; first token \d+ ms; total \d+ ms", err)


async def test_time_limit_flag_ends_generation_with_time_limit(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    box.add("slow", Behaviour(seed=3, token_s=0.05), current=True)
    async with in_process(box) as daemon:
        code = await _run("generate", PROMPT, "--max-tokens", "200", "--time-limit", "0.3",
                          "--target", daemon.box.target)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "finish: FINISH_REASON_TIME_LIMIT" in err


async def test_tokenize_detokenize_and_info(box: Box, capsys: pytest.CaptureFixture[str]) -> None:
    async with in_process(box) as daemon:
        target = daemon.box.target
        assert await _run("tokenize", "hello", "--target", target) == 0
        ids, err = capsys.readouterr()
        assert await _run("tokenize", "hi", "--tokens", "--target", target) == 0
        listed = capsys.readouterr().out
        assert await _run("detokenize", *ids.split(), "--target", target) == 0
        text = capsys.readouterr().out
        assert await _run("info", "--target", target) == 0
        info = capsys.readouterr().out
    assert ids == "104 101 108 108 111\n"  # the fake engine's tokens are bytes
    assert err.startswith("--- 5 tokens (version ")
    assert listed.splitlines() == ["     104  'h'", "     105  'i'"]
    assert text == "hello\n"
    for line in ("model:", "engine:", "load:", "limits:"):
        assert line in info.splitlines()
    assert re.search(r"^ +scheduling_policy  fcfs$", info, re.MULTILINE)
    assert re.search(r"^ +max_top_n_tokens  5$", info, re.MULTILINE)
    assert re.search(r"^ +serving_digest  [0-9a-f]{64}$", info, re.MULTILINE)
    assert re.search(r"^ +architecture  Phi3ForCausalLM$", info, re.MULTILINE)
