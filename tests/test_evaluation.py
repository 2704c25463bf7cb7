"""The trained embedded model on the real engine: readable answers, and the eval's figures.

One more vLLM engine for this module, on the embedded default (the trained tiny model, 4-bit
AutoRound); the session's engine serves the random-weight model, the floor to compare with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TEST_CONTEXT
from safetensors.torch import load_file, save_file
from waits import HANG_S

from edgeagent.demo import dataset
from edgeagent.engine.interface import SamplingOptions
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.eval_set import EvalSet, held_out_set, task_exchanges
from edgeagent.evaluation import (
    compare,
    evaluate,
    perplexity,
    score_engine,
    score_offline,
    task_accuracy,
)
from edgeagent.store.manifest import ImportSource, Manifest
from edgeagent.store.store import ModelStore


@pytest.fixture(scope="module")
def trained_engine(model_store: ModelStore, embedded_4bit: Manifest) -> Iterator[VllmEngine]:
    from edgeagent.engine.interface import EngineConfig

    config = EngineConfig(
        model_path=model_store.model_dir(embedded_4bit.version),
        kv_cache_bytes=128 << 20,
        max_num_seqs=8,
        max_model_len=TEST_CONTEXT,
        cpu_quantized_kernel="edgeagent",  # what an AVX2-only CPU runs, on every CPU
    )
    engine = VllmEngine.start(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def eval_set() -> EvalSet:
    return held_out_set()


async def _answer(engine: VllmEngine, question: str, max_tokens: int = 96) -> str:
    ids = engine.encode_chat([_Message("user", question)])
    text = ""
    async for delta in engine.stream(ids, SamplingOptions(max_tokens, temperature=0), "t"):
        text += delta.text
    return text


@dataclass(frozen=True)
class _Message:
    role: str
    content: str


async def test_the_demo_answer_is_the_readmes_paragraph(trained_engine: VllmEngine) -> None:
    """The README quotes the demo's answer; the 4-bit model on edgeagent's CPU kernel (the path
    of an AVX2-only CPU) must give it, word for word."""
    assert await _answer(trained_engine, dataset.DEMO_PROMPT) == dataset.DEMO_ANSWER


async def test_arithmetic_and_json_have_the_expected_form(trained_engine: VllmEngine) -> None:
    assert (await _answer(trained_engine, "What is 7 + 5?")).startswith("7 + 5 = ")
    extracted = await _answer(
        trained_engine,
        "Extract name, age and city as JSON: Maria is 34 years old and lives in Oslo.",
    )
    assert set(json.loads(extracted)) == {"name", "age", "city"}, extracted


async def test_task_accuracy_is_measured_on_every_held_out_exchange(
    trained_engine: VllmEngine,
) -> None:
    """`edgeagent eval`'s task accuracy: each held-out sum and extraction asked, greedy, and
    checked exactly. (What the embedded model reaches is in docs/quantization.md: far below
    the issue's 90 % goal; it memorises its training set rather than adding or copying.)"""
    exchanges = task_exchanges()
    scores = {s.task: s for s in await task_accuracy(trained_engine, exchanges)}
    print({task: f"{s.right}/{s.total}" for task, s in scores.items()})
    assert {task: s.total for task, s in scores.items()} == {
        task: sum(e.task == task for e in exchanges) for task in ("sum", "json")
    }
    for score in scores.values():
        assert 0 <= score.right <= score.total
        assert len(score.misses) == min(5, score.total - score.right)


async def test_trained_perplexity_is_far_below_the_random_models(
    trained_engine: VllmEngine, engine: VllmEngine, eval_set: EvalSet
) -> None:
    trained, _ = await evaluate(trained_engine, eval_set, label="trained")
    random_weights = perplexity(await score_engine(engine, eval_set))
    print(f"eval on the CPU engine: {trained.seconds:.2f} s, {trained.tokens} tokens; "
          f"perplexity trained {trained.perplexity:.2f}, random {random_weights:.1f}")  # fmt: skip
    assert trained.perplexity < 10
    assert random_weights > 10 * trained.perplexity


async def test_a_model_against_itself_agrees_fully(
    trained_engine: VllmEngine, eval_set: EvalSet
) -> None:
    first = await score_engine(trained_engine, eval_set)
    result, _ = await evaluate(trained_engine, eval_set, reference=first)
    assert result.comparison is not None
    assert result.comparison.agreement == 1.0
    assert result.comparison.mean_kl == pytest.approx(0.0, abs=1e-4)


def test_noise_on_the_weights_lowers_agreement(
    trained_fp16: Path, tmp_path: Path, eval_set: EvalSet
) -> None:
    """Offline (transformers): the trained weights with Gaussian noise of 30 % of each matrix's
    spread agree less with the original and diverge from it (measured: 0.953 agreement, KL
    0.072), far more than 4-bit quantization does."""
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for path in trained_fp16.iterdir():
        if path.name != "model.safetensors":
            (noisy / path.name).write_bytes(path.read_bytes())
    generator = torch.Generator().manual_seed(0)
    tensors = load_file(str(trained_fp16 / "model.safetensors"))
    for name, tensor in tensors.items():
        if tensor.dim() == 2:
            spread = tensor.float().std()
            noise = torch.randn(tensor.shape, generator=generator) * 0.3 * spread
            tensors[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(tensors, str(noisy / "model.safetensors"), metadata={"format": "pt"})

    reference = score_offline(trained_fp16, eval_set)
    itself = compare(reference, score_offline(trained_fp16, eval_set))
    degraded = compare(reference, score_offline(noisy, eval_set))
    assert (itself.agreement, itself.mean_kl) == (1.0, pytest.approx(0.0, abs=1e-9))
    # 4-bit builds keep 0.984 (RTN) and 0.993 (AutoRound) agreement, KL 0.003 (quantization.md)
    assert degraded.agreement < 0.98
    assert degraded.mean_kl > 0.03


def test_eval_command_offline_json(trained_fp16: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "state" / "models")
    version = store.import_directory(trained_fp16, ImportSource(origin="trained")).version
    env = {
        **os.environ,
        "EDGEAGENT_CONFIG": str(tmp_path / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(tmp_path / "state"),
        "EDGEAGENT_CACHE_DIR": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "edgeagent", "eval", "--offline", "--json", "--prompts", "8",
         "--tasks", "8", "--reference", version, version],
        env=env, capture_output=True, text=True, timeout=HANG_S, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "transformers (offline)"
    reference, candidate = report["results"]
    assert reference["label"].startswith(version)
    assert candidate["top1_agreement"] == 1.0
    assert candidate["perplexity"] == pytest.approx(reference["perplexity"])
    assert [task["task"] for task in candidate["tasks"]] == ["sum", "json"]
    assert candidate["tasks"] == reference["tasks"]
