"""`edgeagent eval`: perplexity on the eval set, agreement and KL against a reference, and, on
the embedded model's held-out set, its tasks' accuracy (sums exactly right, JSON fields copied
from the sentence). The set is chosen as the update gate chooses it (`eval_set.py`), for the
first version named (the one judged), unless `--eval-set` names one."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeagent.errors import ConfigError
from edgeagent.eval_set import (
    EVAL_PROMPTS,
    MAX_PROMPT_TOKENS,
    EvalSet,
    check_tokens,
    configured_file,
    eval_set_for,
    rendered_file,
    task_exchanges,
)

if TYPE_CHECKING:
    from edgeagent.settings import Settings
    from edgeagent.store.manifest import Manifest
    from edgeagent.store.store import ModelStore

EVAL_CONTEXT = MAX_PROMPT_TOKENS + 1  # the longest prompt a set may have, and the token scored
EVAL_KV_CACHE_BYTES = 128 << 20  # at least; more where the model needs it for EVAL_CONTEXT


def add_commands(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="perplexity on the eval set (task accuracy on the embedded model's); agreement "
        "and KL against a reference",
        description="Scores stored versions on one eval set: --eval-set if given, else the "
        "eval.jsonl the first VERSION ships, else updates.eval_set, else the default for its "
        "model (the embedded model's held-out exchanges; the project's general exchanges for "
        "any other, such as Phi-4), as the update gate chooses; the first line says which. "
        "Each version is loaded into its own vLLM engine on this machine (prompt "
        "log-probabilities), or with --offline into transformers (unquantized versions only). "
        "Agreement and mean KL are against --reference, on the same prompts; the KL uses the "
        "top 20 tokens of each distribution (see docs/quantization.md). Task accuracy, on the "
        "held-out set only: the share of held-out sums answered exactly right and of JSON "
        "extractions with every field copied from the sentence, greedy.",
    )
    evaluate.add_argument("versions", nargs="*", default=["current"], help="default: current")
    evaluate.add_argument("--reference", help="a version to compare with, e.g. the fp16 model")
    evaluate.add_argument("--offline", action="store_true", help="transformers, not vLLM")
    evaluate.add_argument(
        "--eval-set", type=Path, help="a JSONL of prompts or chat exchanges (docs/quantization.md)"
    )
    evaluate.add_argument(
        "--prompts", type=int, default=EVAL_PROMPTS, help="prompts of a built-in set"
    )
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
    eval_set = chosen_eval_set(args, settings, store)
    print(f"eval set: {eval_set.name}", file=sys.stderr, flush=True)  # before the slow part
    reference = None
    results: list[EvalResult] = []
    order = ([args.reference] if args.reference else []) + list(args.versions)
    for name in order:
        version = store.resolve(name)
        manifest = store.manifest(version)
        scores, seconds, tasks = _scores(store.model_dir(version), manifest, eval_set, args)
        label = f"{version} ({manifest.quantization_label})"
        result = replace(result_of(label, scores, seconds, reference), tasks=tuple(tasks))
        if args.reference and reference is None:
            reference = scores
        results.append(result)
    if args.json:
        print(json.dumps({"eval_set": eval_set.name, "eval_set_source": eval_set.source,
                          "backend": _backend(args),
                          "results": [r.as_dict() for r in results]}, indent=2))  # fmt: skip
    else:
        print(table(results, eval_set))
        if eval_set.has_tasks:
            print(task_table(results))
    return 0


def chosen_eval_set(args: argparse.Namespace, settings: Settings, store: ModelStore) -> EvalSet:
    """--eval-set, else what the gate would judge the first version named on; its files are
    read and checked before any engine starts."""
    version = store.resolve(args.versions[0])
    model_dir = store.model_dir(version)
    if args.eval_set is not None:
        return rendered_file(configured_file(args.eval_set, "flag"), model_dir)
    setting = settings.updates.eval_set
    configured = configured_file(setting) if setting is not None else None
    return eval_set_for(store.manifest(version), model_dir, configured, args.prompts)


def _backend(args: argparse.Namespace) -> str:
    return "transformers (offline)" if args.offline else "vLLM (prompt logprobs)"


def _scores(
    model_dir: Path, manifest: Manifest, eval_set: EvalSet, args: argparse.Namespace
) -> tuple[Any, float, list[Any]]:
    """The version's scores, the seconds the scoring took (not the engine's start), and its
    task accuracy (none but on the held-out set)."""
    from edgeagent.evaluation import (
        score_engine,
        score_offline,
        task_accuracy,
        task_accuracy_offline,
    )

    exchanges = task_exchanges(args.tasks) if eval_set.has_tasks else []
    if args.offline:
        quantization = manifest.quantization_label
        if "gptq" in quantization:
            raise ConfigError(f"--offline scores unquantized models only ({quantization})")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        _check_size(eval_set, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                    manifest.architecture.max_position_embeddings)  # fmt: skip
        started = time.perf_counter()
        scores, seconds = score_offline(model_dir, eval_set), time.perf_counter() - started
        tasks = task_accuracy_offline(model_dir, exchanges) if exchanges else []
        return scores, seconds, tasks
    engine = _start_engine(model_dir, manifest)

    async def score() -> tuple[Any, float, list[Any]]:
        _check_size(eval_set, engine.encode, engine.facts.max_model_len)
        started = time.perf_counter()
        scores = await score_engine(engine, eval_set)
        seconds = time.perf_counter() - started
        tasks = await task_accuracy(engine, exchanges) if exchanges else []
        return scores, seconds, tasks

    try:
        return asyncio.run(score())
    finally:
        engine.shutdown()


def _start_engine(model_dir: Path, manifest: Manifest) -> Any:
    from edgeagent.engine.interface import EngineConfig
    from edgeagent.engine.vllm_engine import VllmEngine
    from edgeagent.fit import kv_bytes_per_token

    # Room for two sequences of the longest prompt (a Phi-4 needs ~400 MiB; the tiny model 4).
    kv_bytes = max(EVAL_KV_CACHE_BYTES,
                   2 * EVAL_CONTEXT * kv_bytes_per_token(manifest.architecture))  # fmt: skip
    config = EngineConfig(model_path=model_dir, kv_cache_bytes=kv_bytes, max_num_seqs=8,
                          max_model_len=EVAL_CONTEXT)  # fmt: skip
    return VllmEngine.start(config)


def _check_size(eval_set: EvalSet, encode: Any, max_model_len: int) -> None:
    try:
        check_tokens(eval_set, [len(encode(text)) for text in eval_set.texts], max_model_len)
    except ValueError as too_large:
        raise ConfigError(str(too_large)) from None
