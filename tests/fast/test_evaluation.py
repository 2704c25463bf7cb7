"""The eval's arithmetic and output, the embedded model's data and training recipe, the demo's
phase lines: no engine, no torch."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from edgeagent.cli.evaluation import add_commands
from edgeagent.demo import dataset
from edgeagent.eval_set import EvalSet, held_out_exchanges, held_out_set
from edgeagent.evaluation import (
    Comparison,
    EvalResult,
    Position,
    compare,
    kl_top_k,
    perplexity,
    table,
)


def _position(token: int, probabilities: dict[int, float]) -> Position:
    known = {t: math.log(p) for t, p in probabilities.items()}
    return Position(token, known[token], known)


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood() -> None:
    scores = [[_position(1, {1: 0.5, 2: 0.5})], [_position(2, {1: 0.75, 2: 0.25})] * 2]
    expected = math.exp(-(math.log(0.5) + 2 * math.log(0.25)) / 3)
    assert perplexity(scores) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no tokens"):
        perplexity([[]])


def test_kl_is_exact_when_both_list_the_whole_distribution() -> None:
    p, q = {1: 0.7, 2: 0.2, 3: 0.1}, {1: 0.5, 2: 0.3, 3: 0.2}
    exact = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    log_p = {t: math.log(v) for t, v in p.items()}
    log_q = {t: math.log(v) for t, v in q.items()}
    assert kl_top_k(log_p, log_q) == pytest.approx(exact)
    assert kl_top_k(log_p, log_p) == pytest.approx(0.0, abs=1e-12)


def test_kl_puts_unlisted_mass_in_one_bucket() -> None:
    """P lists 0.6 + 0.3 (0.1 elsewhere); Q lists token 1 only (0.5), so token 2 gets at most
    Q's smallest listed probability, or an even share of Q's other 0.5: 0.25."""
    p = {1: math.log(0.6), 2: math.log(0.3)}
    q = {1: math.log(0.5)}
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.1 * math.log(0.1 / 0.25)
    assert kl_top_k(p, q) == pytest.approx(expected)


def test_agreement_counts_positions_whose_most_likely_tokens_match() -> None:
    reference = [[_position(1, {1: 0.6, 2: 0.4}), _position(2, {1: 0.3, 2: 0.7})]]
    same = compare(reference, reference)
    assert same == Comparison(1.0, pytest.approx(0.0, abs=1e-12))
    flipped = [[_position(1, {1: 0.4, 2: 0.6}), _position(2, {1: 0.3, 2: 0.7})]]
    result = compare(reference, flipped)
    assert result.agreement == 0.5
    assert result.mean_kl > 0
    with pytest.raises(ValueError, match="tokenized the eval set differently"):
        compare(reference, [[_position(2, {2: 1.0}), _position(2, {2: 1.0})]])


def test_table_and_json_carry_the_same_figures() -> None:
    eval_set = EvalSet("held-out (2 exchanges)", ("a", "b"))
    results = [
        EvalResult("v1 (float16)", 2.5, 40, 0.5),
        EvalResult("v2 (gptq 4-bit g128 sym)", 2.75, 40, 0.75, Comparison(0.95, 0.0123)),
    ]
    lines = table(results, eval_set).splitlines()
    assert lines[0] == "eval set: held-out (2 exchanges)"
    assert lines[1].split()[:2] == ["version", "perplexity"]
    assert "reference" in lines[2]
    assert lines[3].split()[-6:] == ["sym)", "2.750", "0.9500", "0.0123", "40", "0.75"]
    as_json = json.loads(json.dumps([r.as_dict() for r in results]))
    assert as_json[1] == {
        "label": "v2 (gptq 4-bit g128 sym)", "perplexity": 2.75, "tokens": 40,
        "seconds": 0.75, "top1_agreement": 0.95, "mean_kl": 0.0123,
    }  # fmt: skip
    assert "top1_agreement" not in as_json[0]


def test_eval_command_parses() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["eval", "v2", "--reference", "v1", "--json", "--offline"])
    assert (args.versions, args.reference, args.json, args.offline) == (["v2"], "v1", True, True)


def test_held_out_and_training_sets_are_disjoint_and_fixed() -> None:
    held_out = held_out_exchanges()
    training_users = {e.user for e in dataset.exchanges() if not e.held_out}
    assert held_out
    assert not {e.user for e in held_out} & training_users
    assert any(e.user == dataset.DEMO_PROMPT for e in dataset.exchanges() if not e.held_out)
    assert dataset.digest() == dataset.digest()
    eval_set = held_out_set()
    assert len(eval_set.texts) == 32
    assert all(text.startswith("<|im_start|>") for text in eval_set.texts)
    assert {"What", "Add", "Extract"} <= {
        text.split("<|im_sep|>")[1].split()[0] for text in eval_set.texts
    }


def test_demo_prints_each_phase_of_the_daemons_start_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeagent.cli.serving import DAEMON_PHASES, _follow_phases

    log = tmp_path / "daemon.log"
    markers = [marker for marker, _ in DAEMON_PHASES]
    log.write_text("".join(f"noise\n(Worker) INFO {m} ...\n{m} again\n" for m in markers))
    _follow_phases(log, threading.Event(), time.perf_counter())
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("s  ", 1)[1] for line in printed] == [phase for _, phase in DAEMON_PHASES]


def test_the_training_cache_key_follows_the_recipe() -> None:
    from edgeagent.demo.train import TrainRecipe, _learning_rate, cache_key

    recipe = TrainRecipe()
    assert cache_key(recipe) == cache_key(TrainRecipe())
    assert cache_key(recipe) != cache_key(TrainRecipe(steps=recipe.steps + 1))
    assert _learning_rate(recipe, recipe.warmup_steps) == recipe.learning_rate
    assert _learning_rate(recipe, recipe.steps) == pytest.approx(recipe.learning_rate / 10)


def test_the_readme_quotes_the_answer_the_demo_is_taught() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    quoted = readme.split(f"> {dataset.DEMO_PROMPT}\n\n", 1)[1].split("\n```", 1)[0]
    assert " ".join(quoted.split()) == dataset.DEMO_ANSWER
