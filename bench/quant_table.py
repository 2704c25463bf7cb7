"""What 4-bit costs on the embedded model: fp16 vs round-to-nearest GPTQ vs AutoRound GPTQ.

Trains the tiny model (or takes it from the cache), stores it as fp16, builds it to 4-bit GPTQ
twice with the embedded recipe (iters=0: round to nearest; iters=50: AutoRound), adds the
random-weight model as a floor, and scores each on the held-out set in vLLM (prompt logprobs),
against the fp16 model in vLLM; the fp16 model is also scored offline in transformers. Prints a
Markdown table (docs/quantization.md) and, with --json, the raw figures.

    nice -n 19 python bench/quant_table.py --cache-dir .cache --state /tmp/quant-state
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache")
    parser.add_argument("--state", type=Path, required=True, help="a store for the versions")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(args.cache_dir / "vllm"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

    from edgeagent.demo.tiny import build_tiny_model
    from edgeagent.demo.train import trained_tiny_model
    from edgeagent.eval_set import held_out_set
    from edgeagent.evaluation import result_of, score_offline
    from edgeagent.sources.build import (
        EMBEDDED_RECIPE,
        BuildRequest,
        build,
        build_embedded,
        embedded_calibration,
    )
    from edgeagent.store.manifest import ImportSource
    from edgeagent.store.store import ModelStore

    store = ModelStore(args.state / "models")
    eval_set = held_out_set()
    rows: list[dict[str, Any]] = []

    started = time.perf_counter()
    trained = trained_tiny_model(args.cache_dir)
    train_s = time.perf_counter() - started
    fp16 = store.import_directory(trained, ImportSource(origin=str(trained)))
    random_dir = args.state / "random-fp16"
    if not random_dir.exists():
        build_tiny_model(random_dir, seed=0)
    random_fp16 = store.import_directory(random_dir, ImportSource(origin="random weights"))

    started = time.perf_counter()
    rtn_recipe = EMBEDDED_RECIPE.model_copy(update={"iters": 0})
    rtn = build(store, BuildRequest(base=trained, recipe=rtn_recipe, label="tiny rtn",
                                    calibration=embedded_calibration()))  # fmt: skip
    rtn_s = time.perf_counter() - started
    started = time.perf_counter()
    autoround = build_embedded(store, args.cache_dir)
    autoround_s = time.perf_counter() - started

    reference = _engine_scores(store.model_dir(fp16.version), eval_set)
    versions = (
        ("fp16 (vLLM)", fp16, None, f"trained in {train_s:.0f} s (cached if 0)"),
        ("4-bit GPTQ, round to nearest", rtn, rtn_s, "iters=0"),
        ("4-bit GPTQ, AutoRound", autoround, autoround_s, _recipe(EMBEDDED_RECIPE)),
        ("random weights, fp16 (floor)", random_fp16, None, "seed 0, untrained, own tokenizer"),
    )
    for name, manifest, build_s, settings in versions:
        started = time.perf_counter()
        scores = (
            reference
            if manifest is fp16
            else _engine_scores(store.model_dir(manifest.version), eval_set)
        )
        compared = None if manifest is random_fp16 else reference  # another tokenizer
        result = result_of(name, scores, time.perf_counter() - started, compared)
        rows.append({**result.as_dict(), "version": manifest.version, "build_s": build_s,
                     "settings": settings})  # fmt: skip
    offline = score_offline(store.model_dir(fp16.version), eval_set)
    result = result_of("fp16 (transformers, offline)", offline, 0.0, reference)
    rows.append({**result.as_dict(), "version": fp16.version, "build_s": None,
                 "settings": "float32 compute"})  # fmt: skip
    print(_markdown(rows, eval_set.name))
    if args.json:
        args.json.write_text(json.dumps({"eval_set": eval_set.name, "rows": rows}, indent=2))


def _engine_scores(model_dir: Path, eval_set: Any) -> Any:
    from edgeagent.engine.interface import EngineConfig
    from edgeagent.engine.vllm_engine import VllmEngine
    from edgeagent.evaluation import score_engine

    config = EngineConfig(model_path=model_dir, kv_cache_bytes=128 << 20, max_num_seqs=8,
                          max_model_len=1024)  # fmt: skip
    engine = VllmEngine.start(config)
    try:
        started = time.perf_counter()
        scores = asyncio.run(score_engine(engine, eval_set))
        print(f"{model_dir.name}: scored in {time.perf_counter() - started:.2f} s", flush=True)
        return scores
    finally:
        engine.shutdown()


def _recipe(recipe: Any) -> str:
    return (f"W{recipe.bits} g{recipe.group_size} sym, iters={recipe.iters}, "
            f"nsamples={recipe.nsamples}, seqlen={recipe.seqlen}")  # fmt: skip


def _markdown(rows: list[dict[str, Any]], eval_set: str) -> str:
    lines = [
        f"Eval set: {eval_set}; agreement and KL against the fp16 model in vLLM.",
        "",
        "| model | perplexity | top-1 agreement | mean KL (nats, top-20) | build s | settings |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        build_s = f"{row['build_s']:.1f}" if row["build_s"] is not None else ""
        agreement, kl = (
            (f"{row['top1_agreement']:.4f}", f"{row['mean_kl']:.4f}")
            if "top1_agreement" in row
            else ("n/a", "n/a")
        )
        lines.append(
            f"| {row['label']} | {row['perplexity']:.3f} | {agreement} | {kl} | {build_s} | "
            f"{row['settings']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
