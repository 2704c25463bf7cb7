"""`edgeagent eval`: perplexity on the held-out set, agreement and KL against a reference, and
the held-out tasks' accuracy (sums exactly right, JSON fields copied from the sentence)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from edgeagent.errors import ConfigError
from edgeagent.eval_set import EVAL_PROMPTS, EvalSet, held_out_set, task_exchanges

EVAL_CONTEXT = 1024  # the held-out exchanges are a few hundred tokens at most
EVAL_KV_CACHE_BYTES = 128 << 20


def add_commands(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="perplexity and task accuracy on the held-out set; agreement and KL against a "
        "reference",
        description="Scores stored versions on the embedded model's held-out set. Each version "
        "is loaded into its own vLLM engine on this machine (prompt log-probabilities), or with "
        "--offline into transformers (unquantized versions only). Agreement and mean KL are "
        "against --reference, on the same prompts; the KL uses the top 20 tokens of each "
        "distribution (see docs/quantization.md). Task accuracy: the share of held-out sums "
        "answered exactly right and of JSON extractions with every field copied from the "
        "sentence, greedy.",
    )
    evaluate.add_argument("versions", nargs="*", default=["current"], help="default: current")
    evaluate.add_argument("--reference", help="a version to compare with, e.g. the fp16 model")
    evaluate.add_argument("--offline", action="store_true", help="transformers, not vLLM")
    evaluate.add_argument("--prompts", type=int, default=EVAL_PROMPTS, help="held-out prompts")
    evaluate.add_argument(
        "--tasks", type=int, default=None, help="held-out exchanges per task (default: all)"
    )
    evaluate.add_argument("--json", action="store_true", help="one JSON object on stdout")
    evaluate.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgeagent.evaluation import EvalResult, result_of, table, task_table
    from edgeagent.settings import Settings
    from edgeagent.store.store import open_store

    settings = Settings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(settings.cache_dir / "vllm"))
    store = open_store(settings)
    eval_set = held_out_set(args.prompts)
    reference = None
    results: list[EvalResult] = []
    order = ([args.reference] if args.reference else []) + list(args.versions)
    for name in order:
        version = store.resolve(name)
        manifest = store.manifest(version)
        scores, seconds, tasks = _scores(store.model_dir(version), manifest.quantization_label,
                                         eval_set, args)  # fmt: skip
        label = f"{version} ({manifest.quantization_label})"
        result = replace(result_of(label, scores, seconds, reference), tasks=tuple(tasks))
        if args.reference and reference is None:
            reference = scores
        results.append(result)
    if args.json:
        print(json.dumps({"eval_set": eval_set.name, "backend": _backend(args),
                          "results": [r.as_dict() for r in results]}, indent=2))  # fmt: skip
    else:
        print(table(results, eval_set))
        print(task_table(results))
    return 0


def _backend(args: argparse.Namespace) -> str:
    return "transformers (offline)" if args.offline else "vLLM (prompt logprobs)"


def _scores(
    model_dir: Path, quantization: str, eval_set: EvalSet, args: argparse.Namespace
) -> tuple[Any, float, list[Any]]:
    """The version's scores, the seconds the scoring took (not the engine's start), and its
    task accuracy."""
    from edgeagent.evaluation import (
        score_engine,
        score_offline,
        task_accuracy,
        task_accuracy_offline,
    )

    if args.offline:
        if "gptq" in quantization:
            raise ConfigError(f"--offline scores unquantized models only ({quantization})")
        started = time.perf_counter()
        scores, seconds = score_offline(model_dir, eval_set), time.perf_counter() - started
        return scores, seconds, task_accuracy_offline(model_dir, task_exchanges(args.tasks))
    from edgeagent.engine.interface import EngineConfig
    from edgeagent.engine.vllm_engine import VllmEngine

    config = EngineConfig(model_path=model_dir, kv_cache_bytes=EVAL_KV_CACHE_BYTES,
                          max_num_seqs=8, max_model_len=EVAL_CONTEXT)  # fmt: skip
    engine = VllmEngine.start(config)

    async def score() -> tuple[Any, float, list[Any]]:
        started = time.perf_counter()
        scores = await score_engine(engine, eval_set)
        seconds = time.perf_counter() - started
        return scores, seconds, await task_accuracy(engine, task_exchanges(args.tasks))

    try:
        return asyncio.run(score())
    finally:
        engine.shutdown()
