"""How good is a model version: perplexity on a held-out set, and how close it is to a reference.

A version is scored by reading, for every token of every prompt in the eval set
(`eval_set.py`), the log-probability the model gave that token and the model's `top_k` most
likely tokens at that position. Two scorers produce the same `Scores`: `score_engine` asks a
running engine for prompt log-probabilities (vLLM's `prompt_logprobs`; the update gate calls it
in-process on the engine it is about to promote), and `score_offline` runs transformers on an
unquantized model directory.

From scores: perplexity (exact: it needs only each actual token's log-probability); against a
reference's scores on the same prompts, top-1 agreement (exact: the most likely token is in any
top-k) and mean KL divergence KL(reference || candidate), which is approximate because an engine
gives only the top k of a distribution. The approximation (see `kl_top_k`) compares the two
distributions over the reference's known tokens plus one bucket for all others.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.demo.dataset import Exchange
from edgeagent.engine.interface import Engine, SamplingOptions, TokenDetail
from edgeagent.eval_set import EvalSet

TOP_K = 20  # vLLM's default max_logprobs: the most an engine gives without a setting changed
FLOOR = 1e-12  # a probability never reaches zero in the KL's logarithm
ANSWER_TOKENS = 48  # the longest task answer (a JSON object) is about 25 tokens
MISSES = 5  # wrong answers kept in a task's score, to show what went wrong


@dataclass(frozen=True)
class Position:
    """What a model said of one token of a prompt: its log-probability and the log-probabilities
    it knows at that position (its top k, and the actual token whatever its rank)."""

    token: int
    logprob: float
    known: dict[int, float]

    @property
    def top1(self) -> int:
        return max(self.known, key=lambda token: (self.known[token], -token))


Scores = list[list[Position]]  # per prompt, per predicted token (the first token has none)


@dataclass(frozen=True)
class Comparison:
    agreement: float  # share of positions where both models' most likely token is the same
    mean_kl: float  # nats per position, approximate (see kl_top_k)


@dataclass(frozen=True)
class EvalResult:
    label: str
    perplexity: float
    tokens: int
    seconds: float
    comparison: Comparison | None = None
    tasks: tuple[TaskScore, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "label": self.label,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
        }
        if self.comparison is not None:
            result["top1_agreement"] = self.comparison.agreement
            result["mean_kl"] = self.comparison.mean_kl
        if self.tasks:
            result["tasks"] = [task.as_dict() for task in self.tasks]
        return result


@dataclass(frozen=True)
class TaskScore:
    """How many held-out exchanges of one task a model answered exactly right (greedy)."""

    task: str
    right: int
    total: int
    misses: tuple[tuple[str, str], ...] = ()  # (question, answer) of the first few wrong

    @property
    def accuracy(self) -> float:
        return self.right / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "right": self.right, "total": self.total,
                "accuracy": self.accuracy, "misses": [list(m) for m in self.misses]}  # fmt: skip


async def task_accuracy(
    engine: Engine, exchanges: Sequence[Exchange], max_tokens: int = ANSWER_TOKENS
) -> list[TaskScore]:
    """Each task's share of exchanges answered exactly right by a running engine, greedy."""
    answers = await asyncio.gather(*(_generate(engine, e.prompt(), max_tokens) for e in exchanges))
    return task_scores(exchanges, answers)


async def _generate(engine: Engine, prompt: str, max_tokens: int) -> str:
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0)
    text = ""
    async for delta in engine.stream(engine.encode(prompt), options, f"task-{uuid.uuid4().hex}"):
        text += delta.text
    return text


def task_accuracy_offline(
    model_dir: Path, exchanges: Sequence[Exchange], max_tokens: int = ANSWER_TOKENS
) -> list[TaskScore]:
    """The same from transformers on an unquantized model directory (float32, CPU, greedy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    answers: list[str] = []
    with torch.inference_mode():
        for exchange in exchanges:
            ids = tokenizer(exchange.prompt(), add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            answer = out[0, ids["input_ids"].shape[1] :]
            answers.append(str(tokenizer.decode(answer, skip_special_tokens=True)))
    return task_scores(exchanges, answers)


def task_scores(exchanges: Sequence[Exchange], answers: Sequence[str]) -> list[TaskScore]:
    by_task: dict[str, list[tuple[Exchange, str]]] = {}
    for exchange, answer in zip(exchanges, answers, strict=True):
        by_task.setdefault(exchange.task, []).append((exchange, answer))
    scores = []
    for task, pairs in by_task.items():
        wrong = [(e.user, a) for e, a in pairs if not e.is_right(a)]
        scores.append(TaskScore(task, len(pairs) - len(wrong), len(pairs), tuple(wrong[:MISSES])))
    return scores


async def score_engine(engine: Engine, eval_set: EvalSet, top_k: int = TOP_K) -> Scores:
    """Every prompt's token log-probabilities from a running engine, all prompts at once."""
    return list(await asyncio.gather(*(_score_prompt(engine, t, top_k) for t in eval_set.texts)))


async def _score_prompt(engine: Engine, text: str, top_k: int) -> list[Position]:
    options = SamplingOptions(max_tokens=1, temperature=0.0, prompt_logprobs=top_k)
    details: tuple[TokenDetail, ...] = ()
    async for delta in engine.stream(engine.encode(text), options, f"eval-{uuid.uuid4().hex}"):
        details = details or delta.prompt_tokens
    positions: list[Position] = []
    for detail in details[1:]:  # nothing predicts the first token
        if detail.logprob is None:
            raise ValueError(f"the engine gave no log-probability for prompt token {detail.id}")
        known = {top.id: top.logprob for top in detail.top}
        known[detail.id] = detail.logprob
        positions.append(Position(detail.id, detail.logprob, known))
    return positions


def score_offline(model_dir: Path, eval_set: EvalSet, top_k: int = TOP_K) -> Scores:
    """The same scores from transformers on an unquantized model directory (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]  # transformers' nn.Module
    scores: Scores = []
    with torch.inference_mode():
        for text in eval_set.texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            top = torch.topk(logprobs, top_k, dim=-1)
            positions = []
            for row, token in enumerate(ids[0, 1:].tolist()):
                known = dict(zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True))
                known[token] = float(logprobs[row, token])
                positions.append(Position(token, known[token], known))
            scores.append(positions)
    return scores


def perplexity(scores: Scores) -> float:
    """exp of the mean negative log-likelihood over every predicted token of every prompt."""
    logprobs = [p.logprob for prompt in scores for p in prompt]
    if not logprobs:
        raise ValueError("no tokens were scored")
    return math.exp(-sum(logprobs) / len(logprobs))


def compare(reference: Scores, candidate: Scores) -> Comparison:
    """Top-1 agreement and mean approximate KL(reference || candidate), position by position."""
    if len(reference) != len(candidate):
        raise ValueError("the two were scored on different eval sets")
    pairs: list[tuple[Position, Position]] = []
    for ref_prompt, cand_prompt in zip(reference, candidate, strict=True):
        if [p.token for p in ref_prompt] != [p.token for p in cand_prompt]:
            raise ValueError("the two models tokenized the eval set differently")
        pairs += zip(ref_prompt, cand_prompt, strict=True)
    if not pairs:
        raise ValueError("no tokens were scored")
    agreement = sum(r.top1 == c.top1 for r, c in pairs) / len(pairs)
    mean_kl = sum(kl_top_k(r.known, c.known) for r, c in pairs) / len(pairs)
    return Comparison(agreement, mean_kl)


def kl_top_k(reference: dict[int, float], candidate: dict[int, float]) -> float:
    """KL(P || Q) over the reference's known tokens plus one bucket for every other token.

    P is exact on its known tokens; the bucket holds the rest of its mass. Q's probability of
    a token it does not list is unknown but at most its smallest listed one; it is taken as that
    bound, or as an even share of Q's unlisted mass if smaller. When Q lists every token P does,
    this is the KL of the two distributions seen through that partition: a lower bound of the
    full KL, equal to it when both put (almost) all their mass on the listed tokens.
    """
    p = {token: math.exp(logprob) for token, logprob in reference.items()}
    q_listed = {token: math.exp(logprob) for token, logprob in candidate.items()}
    unlisted_mass = max(0.0, 1.0 - sum(q_listed.values()))
    missing = [token for token in p if token not in q_listed]
    guess = min(min(q_listed.values(), default=1.0), unlisted_mass / (len(missing) + 1))
    q = {token: q_listed.get(token, guess) for token in p}
    p_rest = max(0.0, 1.0 - sum(p.values()))
    q_rest = max(FLOOR, 1.0 - sum(q.values()))
    total = sum(pt * math.log(pt / max(q[token], FLOOR)) for token, pt in p.items() if pt > 0)
    if p_rest > 0:
        total += p_rest * math.log(p_rest / q_rest)
    return max(0.0, total)


async def evaluate(
    engine: Engine, eval_set: EvalSet, reference: Scores | None = None, label: str = ""
) -> tuple[EvalResult, Scores]:
    """The update gate's call: score a running engine, compare with `reference` if given."""
    started = time.perf_counter()
    scores = await score_engine(engine, eval_set)
    return result_of(label, scores, time.perf_counter() - started, reference), scores


def result_of(
    label: str, scores: Scores, seconds: float, reference: Scores | None = None
) -> EvalResult:
    comparison = compare(reference, scores) if reference is not None else None
    tokens = sum(len(prompt) for prompt in scores)
    return EvalResult(label, perplexity(scores), tokens, seconds, comparison)


def task_table(results: Sequence[EvalResult]) -> str:
    """Each version's task accuracy, one line each: "sum 0.95 (232/244)  json ..."."""
    lines = ["task accuracy on the held-out exchanges (greedy, exactly right):"]
    for result in results:
        cells = [f"{t.task} {t.accuracy:.3f} ({t.right}/{t.total})" for t in result.tasks]
        lines.append(f"{result.label}  " + "  ".join(cells))
    return "\n".join(lines)


def table(results: Sequence[EvalResult], eval_set: EvalSet) -> str:
    """The results as a text table; agreement and KL are against the first row."""
    header = ("version", "perplexity", "top-1 agreement", f"mean KL (top-{TOP_K})", "tokens",
              "scoring s")  # fmt: skip
    rows = [header]
    for result in results:
        c = result.comparison
        rows.append((
            result.label,
            f"{result.perplexity:.3f}",
            f"{c.agreement:.4f}" if c else "reference" if len(results) > 1 else "-",
            f"{c.mean_kl:.4f}" if c else "-",
            str(result.tokens),
            f"{result.seconds:.2f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [f"eval set: {eval_set.name}"]
    for row in rows:
        cells = (cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(
            zip(row, widths, strict=True)))  # fmt: skip
        lines.append("  ".join(cells))
    return "\n".join(lines)
