"""`edgeagent fit [VERSION]`: will this version fit this device, and with what sizes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from edgeagent.errors import NoServableVersionError
from edgeagent.fit import FitRequest, GiB, Plan, plan


def add_commands(commands: Any) -> None:
    fit = commands.add_parser("fit", help="check that a version fits this GPU (or RAM)")
    fit.add_argument("version", nargs="?", default="current")
    fit.add_argument("--json", action="store_true", help="machine-readable output")
    fit.add_argument("--max-model-len", type=int)
    fit.add_argument("--max-num-seqs", type=int)
    fit.add_argument("--kv-cache-gib", type=float)
    fit.add_argument("--budget-gib", type=float)
    fit.set_defaults(handler=_fit)


def _fit(args: argparse.Namespace) -> int:
    from edgeagent.gpu import default_probe
    from edgeagent.settings import Settings
    from edgeagent.store.store import open_store

    settings = Settings()
    manifest = open_store(settings).manifest(args.version)
    request = dataclasses.replace(FitRequest.from_settings(settings), **_overrides(args))
    verdict = plan(manifest.architecture, default_probe().read(), request)
    if args.json:
        print(json.dumps({"version": manifest.version, **_as_json(verdict)}, indent=2))
    else:
        _print_table(manifest.version, verdict)
    return 0 if verdict.fits else NoServableVersionError.exit_code


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.max_model_len is not None:
        overrides["max_model_len"] = args.max_model_len
    if args.max_num_seqs is not None:
        overrides["max_num_seqs"] = args.max_num_seqs
    if args.kv_cache_gib is not None:
        overrides["kv_cache_bytes"] = int(args.kv_cache_gib * GiB)
    if args.budget_gib is not None:
        overrides["budget_bytes"] = int(args.budget_gib * GiB)
    return overrides


def _as_json(verdict: Plan) -> dict[str, Any]:
    data = dataclasses.asdict(verdict)
    data["predicted_bytes"] = verdict.predicted_bytes
    return data


def _print_table(version: str, verdict: Plan) -> None:
    device = verdict.device
    rows = [
        ("version", version),
        ("device", f"{device.name} ({device.kind})"),
        ("free / total", f"{_g(device.free_bytes)} / {_g(device.total_bytes)}"),
        ("available", _g(verdict.available_bytes)),
        ("weights", _g(verdict.weight_bytes)),
        ("overhead", _g(verdict.overhead_bytes)),
        ("KV per token", f"{verdict.kv_bytes_per_token / 1024:.1f} KiB"),
        ("KV cache", _g(verdict.kv_cache_bytes)),
        ("context", f"{verdict.max_model_len} tokens"),
        ("concurrency", f"{verdict.max_concurrency} sequences at full context"),
        ("predicted", _g(verdict.predicted_bytes)),
        ("verdict", "fits" if verdict.fits else "DOES NOT FIT"),
    ]
    rows += [("note", note) for note in verdict.notes]
    rows += [("problem", problem) for problem in verdict.problems]
    for label, value in rows:
        print(f"{label:>13}  {value}")


def _g(size: int) -> str:
    return f"{size / GiB:.2f} GiB"
