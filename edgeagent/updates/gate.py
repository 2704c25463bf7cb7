"""The quality gate: a candidate is promoted only if it scores close to the version it replaces.

A smoke test catches a candidate that cannot run or produces non-finite numbers; a botched
quantization, the wrong checkpoint or noise on the weights all pass it. Between the smoke test
and promotion the gate scores the candidate on the eval set chosen for it (`eval_set.py`: the
eval.jsonl it ships, else `updates.eval_set`, else its model's default; the candidate is the
version being judged, so its set is the one both are scored on; the scoring is
`evaluation.py`'s) on the engine that will serve it, and compares it with the serving version,
scored on the same prompts before the pause (its scores are kept per version and set, so a
version is scored once per set). It is refused when its perplexity grows by more than
`max_perplexity_ratio`, when its most likely token agrees with the serving version's at fewer
than `min_top1_agreement` of the positions, or when it splits the eval set into other tokens
(another model). The figures of the last candidate it scored are kept (`last`) for the
metrics (`edgeagent_gate_*`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from edgeagent.engine.bounds import StepBounds, within
from edgeagent.engine.interface import Engine
from edgeagent.engine.slot import Serving
from edgeagent.errors import ConfigError, CorruptArtifactError, EngineUnresponsiveError, LoadError
from edgeagent.eval_set import EvalFile, EvalSet, check_tokens, eval_set_for
from edgeagent.evaluation import Scores, compare, perplexity, score_engine
from edgeagent.store.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    version: str
    eval_set: EvalSet  # the candidate's, which it is scored on too
    scores: Scores
    perplexity: float
    seconds: float  # the scoring took: what bounds the candidate's (engine/bounds.py)


@dataclass(frozen=True)
class GateFigures:
    """The last gated candidate's figures against the version it would replace, and the limits
    they were held to. `finished_at` is wall-clock."""

    candidate: str
    reference: str
    perplexity: float
    reference_perplexity: float
    max_perplexity_ratio: float
    top1_agreement: float
    min_top1_agreement: float
    mean_kl: float  # nats per position
    passed: bool
    seconds: float
    finished_at: float
    eval_set: str = ""  # its name: what it is and where it came from

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity / self.reference_perplexity


class QualityGate:
    def __init__(
        self, *, enabled: bool = True, max_perplexity_ratio: float = 1.2,
        min_top1_agreement: float = 0.9, eval_file: EvalFile | None = None,
        eval_set: EvalSet | None = None, bounds: StepBounds | None = None,
    ) -> None:  # fmt: skip
        """`eval_file`: `updates.eval_set`, read and checked; `eval_set`: one set for every
        candidate, whatever it ships (tests)."""
        self.enabled = enabled
        self._bounds = bounds or StepBounds()
        self._max_ratio, self._min_agreement = max_perplexity_ratio, min_top1_agreement
        self._eval_file, self._eval_set = eval_file, eval_set
        self._reference: Reference | None = None
        self.last: GateFigures | None = None  # the last candidate scored, passed or refused

    @property
    def max_perplexity_ratio(self) -> float:
        return self._max_ratio

    @property
    def min_top1_agreement(self) -> float:
        return self._min_agreement

    def eval_set_for(self, candidate: Manifest, model_dir: Path) -> EvalSet:
        """The set `candidate` (its files in `model_dir`) is judged on. CorruptArtifactError
        when the eval.jsonl it ships fails; LoadError when `updates.eval_set` cannot be
        rendered in its chat template."""
        if self._eval_set is not None:
            return self._eval_set
        try:
            return eval_set_for(candidate, model_dir, self._eval_file)
        except ConfigError as error:
            raise LoadError(f"quality gate: {error}") from error

    async def reference(self, serving: Serving, candidate: Manifest, model_dir: Path) -> Reference:
        """The serving version's scores on the set `candidate` is judged on (computed while it
        serves, once per version and set)."""
        eval_set = self.eval_set_for(candidate, model_dir)
        logger.info("quality gate: %s is judged on %s", candidate.version, eval_set.name)
        known = self._reference
        if known and known.version == serving.version and known.eval_set.digest == eval_set.digest:
            return known
        tokens = self._tokens(serving.engine, eval_set)
        started = time.perf_counter()
        try:
            scores = await self._scores(serving.engine, serving.version, eval_set, tokens, None)
        except EngineUnresponsiveError:
            raise
        except Exception as error:  # an engine error while scoring
            raise LoadError(f"quality gate: could not score {serving.version}: {error}") from error
        self._reference = Reference(serving.version, eval_set, scores, perplexity(scores),
                                    time.perf_counter() - started)  # fmt: skip
        return self._reference

    @staticmethod
    def _tokens(engine: Engine, eval_set: EvalSet) -> int:
        """The set's tokens on `engine`, before any scoring. A set too large to score in a few
        seconds is LoadError, or, when the candidate shipped it, CorruptArtifactError (marked
        bad: it would never pass)."""
        counts = [len(engine.encode(text)) for text in eval_set.texts]
        try:
            check_tokens(eval_set, counts, engine.facts.max_model_len)
        except ValueError as too_large:
            refusal = CorruptArtifactError if eval_set.source == "version" else LoadError
            raise refusal(f"quality gate: {too_large}") from too_large
        return sum(counts)

    async def _scores(
        self, engine: Engine, version: str, eval_set: EvalSet, tokens: int,
        measured_s: float | None,
    ) -> Scores:  # fmt: skip
        """The set's scores on `engine`, bounded (`measured_s`: the reference's time)."""
        bounds = self._bounds
        return await within(engine, score_engine(engine, eval_set),
                            bounds.scoring_s(measured_s, tokens),
                            f"the quality gate's scoring of {version}", bounds.poll_s)  # fmt: skip

    async def check(self, engine: Engine, version: str, reference: Reference) -> None:
        """Raise LoadError naming the figures when `version`, on `engine`, is not close enough
        to `reference`; remember its scores when it passes (it becomes the reference)."""
        started, eval_set = time.perf_counter(), reference.eval_set
        try:
            tokens = self._tokens(engine, eval_set)
        except CorruptArtifactError as too_large:  # passed on the serving engine: in this
            raise LoadError(str(too_large)) from too_large  # tokenizer, another model
        try:
            scores = await self._scores(engine, version, eval_set, tokens, reference.seconds)
            comparison = compare(reference.scores, scores)
        except EngineUnresponsiveError:
            raise
        except ValueError as different:  # tokenized otherwise: another model
            raise LoadError(f"quality gate: {version} is not comparable with "
                            f"{reference.version} on {eval_set.name} ({different})"
                            ) from different  # fmt: skip
        except Exception as error:  # an engine error while scoring
            raise LoadError(f"quality gate: could not score {version}: {error}") from error
        ppl, seconds = perplexity(scores), time.perf_counter() - started
        ratio = ppl / reference.perplexity
        passed = not (ratio > self._max_ratio or comparison.agreement < self._min_agreement)
        self.last = GateFigures(
            version, reference.version, ppl, reference.perplexity, self._max_ratio,
            comparison.agreement, self._min_agreement, comparison.mean_kl, passed, seconds,
            time.time(), eval_set.name,
        )  # fmt: skip
        figures = (
            f"perplexity {ppl:.3f} against {reference.perplexity:.3f} ({ratio:.2f}x, at most "
            f"{self._max_ratio:.2f}x allowed), top-1 agreement {comparison.agreement:.3f} (at "
            f"least {self._min_agreement:.3f}), mean KL {comparison.mean_kl:.4f} nats, on "
            f"{eval_set.name}, in {seconds:.1f} s"
        )
        if not passed:
            raise LoadError(f"quality gate refused {version}: {figures}")
        logger.info("quality gate passed %s: %s", version, figures)
        self._reference = Reference(version, eval_set, scores, ppl, seconds)
