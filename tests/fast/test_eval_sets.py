"""The operator's own eval set (issue 28): the file format and its errors, the chain that chooses
a version's set (its eval.jsonl, updates.eval_set, its model's default), a bad file refused at
commit or before any slow work, and the gate and `edgeagent eval` naming the set they used."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from edgeagent.cli.evaluation import add_commands, chosen_eval_set
from edgeagent.demo.tiny import EMBEDDED_MODEL_ID
from edgeagent.errors import ConfigError, CorruptArtifactError
from edgeagent.eval_set import (
    MAX_PROMPT_TOKENS,
    MAX_TOKENS,
    EvalSet,
    check_tokens,
    configured_file,
    eval_set_for,
    general_set,
    held_out_set,
)
from edgeagent.preflight import check_settings
from edgeagent.store.eval_file import MAX_FILE_BYTES, MAX_RECORDS, EvalRecord, parse_eval_lines
from edgeagent.store.manifest import BuildSource, ImportSource, Manifest
from edgeagent.store.store import ModelStore
from edgeagent.v1 import admin_pb2 as admin_pb
from fast.fakes import Behaviour, make_fake_model
from fast.runner import Box, in_process

EXCHANGE = {
    "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
}
PHI4_EXCHANGE = (
    "<|im_start|>user<|im_sep|>Hi?<|im_end|><|im_start|>assistant<|im_sep|>Hello.<|im_end|>"
)


def _jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _version(store: ModelStore, root: Path, name: str, eval_jsonl: str | None = None,
             behaviour: Behaviour | None = None, **files: str) -> Manifest:  # fmt: skip
    """A fake version committed to `store`, shipping `eval_jsonl` and `files` (name: text)."""
    model = make_fake_model(root / name, behaviour or Behaviour())
    for file, text in {**files, **({"eval.jsonl": eval_jsonl} if eval_jsonl else {})}.items():
        (model / file).write_text(text)
    return store.import_directory(model, ImportSource(origin=str(model)))


def test_a_file_of_prompts_and_exchanges_is_read_line_by_line() -> None:
    text = _jsonl({"prompt": "The river runs"}, EXCHANGE) + "\n  \n"  # blank lines are skipped
    assert parse_eval_lines(text) == [
        EvalRecord(prompt="The river runs"),
        EvalRecord(messages=(("user", "Hi?"), ("assistant", "Hello."))),
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"prompt": "ok"}\n{"prompt": "unclosed\n', "line 2: Unterminated string"),
        ('{"prompt": "a", "id": 3}\n', 'line 1: expected an object with one key, "prompt" or'),
        ('["a"]\n', "line 1: expected an object"),
        ('{"prompt": "  "}\n', 'line 1: "prompt" must be a non-empty string'),
        ('{"messages": []}\n', 'line 1: "messages" must be a non-empty list'),
        ('{"messages": [{"role": "tool", "content": "x"}]}\n',
         "line 1: messages[0]: role 'tool' is not one of system, user, assistant"),
        ('{"messages": [{"role": "user", "content": 7}]}\n',
         "line 1: messages[0].content must be a non-empty string"),
        ('{"messages": [{"role": "user", "text": "x"}]}\n',
         'line 1: messages[0]: expected an object with "role"'),
        ("\n\n", "no prompts"),
        ('{"prompt": "p"}\n' * (MAX_RECORDS + 1),
         f"line {MAX_RECORDS + 1}: more than {MAX_RECORDS} prompts"),
    ],
)  # fmt: skip
def test_a_bad_line_is_named_with_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)) as raised:
        parse_eval_lines(text)
    assert str(raised.value).startswith(error), raised.value


def test_a_bad_setting_file_is_a_setting_error_before_any_slow_work(box: Box) -> None:
    """updates.eval_set is read and checked by the daemon's first check: a missing file, one
    too large, one not UTF-8 and a bad line each name the setting, the file and the problem."""
    path = box.root / "eval.jsonl"
    cases = {
        "": "cannot read it",
        '{"prompt": "ok"}\n{"prompt": 1}\n': 'line 2: "prompt" must be a non-empty string',
        "x" * (MAX_FILE_BYTES + 1): f"{MAX_FILE_BYTES + 1} bytes, more than the {MAX_FILE_BYTES}",
        '{"prompt": "\xff"}': "not UTF-8",
    }
    for content, error in cases.items():
        if content:
            path.write_bytes(content.encode("latin-1" if "\xff" in content else "utf-8"))
        settings = box.settings(EDGEAGENT_UPDATES__EVAL_SET=str(path))
        with pytest.raises(ConfigError) as raised:
            check_settings(settings)
        assert str(raised.value).startswith(f"updates.eval_set: {path}: "), raised.value
        assert error in str(raised.value)
    path.write_text(_jsonl(EXCHANGE))
    check_settings(box.settings(EDGEAGENT_UPDATES__EVAL_SET=str(path)))


def test_a_version_with_a_bad_eval_file_is_not_committed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(CorruptArtifactError, match=r"eval set eval.jsonl: line 2: messages\[1\]"):
        _version(store, tmp_path, "bad", _jsonl(EXCHANGE, {"messages": [
            {"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}))  # fmt: skip
    assert store.manifests() == []


def test_the_first_source_that_has_a_set_wins(tmp_path: Path) -> None:
    """1. A version's own eval.jsonl (listed and hashed in its manifest), even where the
    operator set one. 2. updates.eval_set. 3. The general set for any model but the embedded
    one, which keeps its held-out exchanges: a Phi-4 never gets the tiny model's set."""
    store = ModelStore(tmp_path / "models")
    shipped = _version(store, tmp_path, "shipped", _jsonl({"prompt": "own"}, EXCHANGE))
    plain = _version(store, tmp_path, "plain")
    assert shipped.eval_file is not None
    assert shipped.eval_file.size > 0
    assert plain.eval_file is None
    (operator := tmp_path / "operator.jsonl").write_text(_jsonl({"prompt": "the operator's"}))
    configured = configured_file(operator)

    own = eval_set_for(shipped, store.model_dir(shipped.version), configured)
    assert (own.source, own.texts) == ("version", ("own", PHI4_EXCHANGE))
    assert own.name == f"eval.jsonl of {shipped.version} (2 prompts)"
    setting = eval_set_for(plain, store.model_dir(plain.version), configured)
    assert (setting.source, setting.texts) == ("setting", ("the operator's",))
    assert setting.name == f"{operator} (updates.eval_set, 1 prompts)"

    phi4 = eval_set_for(plain, store.model_dir(plain.version))
    assert (phi4.source, phi4.has_tasks) == ("general", False)
    assert not set(phi4.texts) & set(held_out_set(1000).texts)
    tiny = plain.model_copy(update={"source": BuildSource(
        base=EMBEDDED_MODEL_ID, base_digest="0" * 64, recipe={}, tool="auto-round")})  # fmt: skip
    held_out = eval_set_for(tiny, store.model_dir(plain.version))
    assert (held_out.source, held_out.has_tasks, held_out.texts) == (
        "held-out", True, held_out_set().texts)  # fmt: skip


def test_exchanges_are_rendered_in_the_versions_own_chat_template(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    template = "{% for m in messages %}[{{ m.role }}|{{ bos_token }}] {{ m.content }}\n{% endfor %}"
    config = json.dumps({"chat_template": template, "bos_token": {"content": "<s>"}})
    own = _version(store, tmp_path, "own", _jsonl(EXCHANGE), **{"tokenizer_config.json": config})
    texts = eval_set_for(own, store.model_dir(own.version)).texts
    assert texts == ("[user|<s>] Hi?\n[assistant|<s>] Hello.\n",)

    strict = "{{ raise_exception('no system role') if messages[0].role == 'system' }}x"
    config = json.dumps({"chat_template": strict})
    no_system = _version(store, tmp_path, "strict", **{"tokenizer_config.json": config})
    (path := tmp_path / "system.jsonl").write_text(
        _jsonl({"messages": [{"role": "system", "content": "Be brief."}]}))  # fmt: skip
    with pytest.raises(ConfigError, match="prompt 1: the chat template failed: no system role"):
        eval_set_for(no_system, store.model_dir(no_system.version), configured_file(path))


def test_sets_are_bounded_in_tokens() -> None:
    eval_set = EvalSet("mine", ("a", "b"))
    check_tokens(eval_set, [MAX_PROMPT_TOKENS, 10], max_model_len=4096)
    with pytest.raises(ValueError, match="mine: prompt 2 is 600 tokens, more than the 511"):
        check_tokens(eval_set, [10, 600], max_model_len=512)
    with pytest.raises(ValueError, match=f"mine: {MAX_TOKENS + 1} tokens, more than the"):
        check_tokens(eval_set, [MAX_PROMPT_TOKENS] * (MAX_TOKENS // MAX_PROMPT_TOKENS) + [1], 4096)


def test_the_general_set_is_valid_and_small() -> None:
    general = general_set(Path("/nonexistent"))  # no tokenizer_config.json: Phi-4's template
    assert len(general.texts) == 32
    assert all(t.startswith("<|im_start|>") and t.endswith("<|im_end|>") for t in general.texts)
    # A byte-level BPE makes at most one token of a byte: within both bounds whatever the model.
    assert max(len(t.encode()) for t in general.texts) <= MAX_PROMPT_TOKENS
    assert sum(len(t.encode()) for t in general.texts) <= MAX_TOKENS


def test_eval_takes_the_same_chain_and_its_own_flag(tmp_path: Path, box: Box) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    store = box.store
    shipped = _version(store, tmp_path, "shipped", _jsonl({"prompt": "own"}))
    (flag := tmp_path / "flag.jsonl").write_text(_jsonl({"prompt": "flagged"}))
    settings = box.settings()

    def chosen(*argv: str) -> EvalSet:
        return chosen_eval_set(parser.parse_args(["eval", *argv]), settings, store)

    assert chosen().source == "general"  # current: version A, a fake (not the embedded model)
    assert chosen(shipped.version, "--reference", "current").source == "version"
    assert chosen(shipped.version, "--eval-set", str(flag)).texts == ("flagged",)
    assert chosen("--eval-set", str(flag)).name == f"{flag} (--eval-set, 1 prompts)"
    flag.write_text("{}")
    with pytest.raises(ConfigError, match=f"--eval-set: {flag}: line 1: expected an object"):
        chosen("--eval-set", str(flag))


async def test_the_gate_judges_on_the_candidates_set_and_names_it(box: Box) -> None:
    """Both candidates score worse (perplexity x7.4). The one that ships eval.jsonl is refused
    on its own set even though the operator set one; the other on the operator's set. A third
    ships a prompt too long to score (the fake engine's tokens are bytes): refused before the
    pause and marked bad (it would never pass)."""
    (operator := box.root / "operator.jsonl").write_text(_jsonl({"prompt": "the operator's"}))
    worse = Behaviour(seed=14, prompt_logprob=-3.0)
    shipped = _version(box.store, box.root, "shipped", _jsonl(EXCHANGE), worse)
    plain = _version(box.store, box.root, "plain", None, worse)
    long = _version(box.store, box.root, "long", _jsonl({"prompt": "x" * 2000}))
    async with in_process(box, EDGEAGENT_UPDATES__EVAL_SET=str(operator)) as daemon:
        own = await daemon.update(shipped.version)
        setting = await daemon.update(plain.version)
        too_long = await daemon.update(long.version)
        status = await daemon.status()
    assert too_long.result == admin_pb.UPDATE_RESULT_REFUSED, too_long.reason
    assert too_long.reason == (
        f"quality gate: eval.jsonl of {long.version} (1 prompts): prompt 1 is 2000 tokens, "
        f"more than the {MAX_PROMPT_TOKENS} a prompt may have"
    )
    assert status.bad_versions[long.version] == too_long.reason
    history = status.history[1:]
    for outcome in (own, setting):
        assert outcome.result == admin_pb.UPDATE_RESULT_ROLLED_BACK, outcome.reason
        assert outcome.reason.startswith("quality gate refused")
    assert f"on eval.jsonl of {shipped.version} (1 prompts)" in own.reason
    assert f"on {operator} (updates.eval_set, 1 prompts)" in setting.reason
    assert [h.reason for h in history[:2]] == [setting.reason, own.reason]
