"""Commands that fill and inspect the model store: fetch, build, models ..."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from edgeagent.settings import BuildSettings, Settings
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore, open_store


def add_commands(commands: Any) -> None:
    fetch = commands.add_parser("fetch", help="download a model from the hub into the store")
    fetch.add_argument("target", nargs="?", help="ORG/NAME[@REVISION]; default: hub.repo")
    fetch.add_argument("--offline", action="store_true", help="only look in the store")
    _activate_flag(fetch)
    fetch.set_defaults(handler=_fetch)

    build = commands.add_parser("build", help="quantize a model to 4-bit GPTQ with AutoRound")
    build.add_argument("base", help="a local model directory, or ORG/NAME[@REVISION] on the hub")
    build.add_argument("--rtn", action="store_true", help="round to nearest: no tuning, seconds")
    for name in ("bits", "group-size", "iters", "nsamples", "seqlen", "batch-size", "threads"):
        build.add_argument(f"--{name}", type=int)
    build.add_argument("--asym", action="store_true", help="asymmetric (not for vLLM on CPU)")
    build.add_argument("--device", choices=["auto", "cpu", "cuda"])
    build.add_argument("--calibration", type=Path, help="a .txt or .jsonl ('text') file")
    _activate_flag(build)
    build.set_defaults(handler=_build)

    models = commands.add_parser("models", help="list, show, verify, activate, roll back, gc")
    actions = models.add_subparsers(required=True, metavar="ACTION")
    actions.add_parser("list", help="every stored version").set_defaults(handler=_list)
    show = actions.add_parser("show", help="a version's manifest as JSON")
    show.add_argument("version", nargs="?", default="current")
    show.set_defaults(handler=_show)
    verify = actions.add_parser("verify", help="re-hash files; exit 5 if any is corrupt")
    verify.add_argument("versions", nargs="*", help="default: every version")
    verify.set_defaults(handler=_verify)
    activate = actions.add_parser("activate", help="make a version current")
    activate.add_argument("version")
    activate.set_defaults(handler=_activate)
    actions.add_parser("rollback", help="swap current and previous").set_defaults(handler=_rollback)
    gc = actions.add_parser("gc", help="remove old versions and abandoned downloads")
    gc.add_argument("--keep", type=int, help="default: store.keep_versions")
    gc.set_defaults(handler=_gc)
    imported = actions.add_parser("import", help="copy a local model directory in")
    imported.add_argument("directory", type=Path)
    _activate_flag(imported)
    imported.set_defaults(handler=_import)


def _activate_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--activate", action="store_true", help="make it current (an empty store always does)"
    )


def _context() -> tuple[Settings, ModelStore]:
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: staging kept or cleaned
    return settings, open_store(settings)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _fetch(args: argparse.Namespace) -> int:
    from edgeagent.sources.fetch import HubTarget
    from edgeagent.sources.prepare import hub_fetcher

    settings, store = _context()
    if args.offline:
        settings = settings.model_copy(
            update={"hub": settings.hub.model_copy(update={"offline": True})}
        )
    target = HubTarget.parse(args.target or f"{settings.hub.repo}@{settings.hub.revision}")
    manifest = hub_fetcher(settings, store).fetch(target)
    return _committed(store, manifest, args.activate)


def _build(args: argparse.Namespace) -> int:
    from edgeagent.sources.build import BuildRequest, build

    settings, store = _context()
    recipe = _recipe(settings.build, args)
    base, label = _base_model(settings, args.base)
    manifest = build(store, BuildRequest(base=base, recipe=recipe, label=label))
    return _committed(store, manifest, args.activate)


def _recipe(defaults: BuildSettings, args: argparse.Namespace) -> BuildSettings:
    overrides = {
        field: getattr(args, field)
        for field in ("bits", "group_size", "iters", "nsamples", "seqlen", "batch_size", "threads")
        if getattr(args, field) is not None
    }
    if args.rtn:
        overrides["iters"] = 0
    extra: dict[str, Any] = {"sym": False} if args.asym else {}
    if args.device:
        extra["device"] = args.device
    if args.calibration:
        extra["calibration"] = args.calibration
    return BuildSettings.model_validate({**defaults.model_dump(), **overrides, **extra})


def _base_model(settings: Settings, base: str) -> tuple[Path, str]:
    """A local directory as is; a hub repo through huggingface_hub's own cache (not the store)."""
    if Path(base).is_dir():
        return Path(base), str(base)
    from huggingface_hub import snapshot_download

    from edgeagent.sources.fetch import MODEL_FILE_PATTERNS, HubTarget

    target = HubTarget.parse(base)
    path = snapshot_download(
        target.repo,
        revision=target.revision,
        allow_patterns=list(MODEL_FILE_PATTERNS),
        cache_dir=settings.cache_dir / "hub",
        token=settings.hub_token_value,
        endpoint=settings.hub.endpoint,
    )
    return Path(path), str(target)


def _committed(store: ModelStore, manifest: Manifest, activate: bool) -> int:
    if activate or store.refs().current is None:
        store.activate(manifest.version)
    print(manifest.version)
    return 0


def _list(args: argparse.Namespace) -> int:
    _, store = _context()
    refs = store.refs()
    marks = {refs.current: "current", refs.previous: "previous"}
    rows = [("VERSION", "REF", "MODEL", "SOURCE", "QUANTIZATION", "SIZE", "CREATED")]
    for m in reversed(store.manifests()):
        created = m.created.strftime("%Y-%m-%d %H:%M")
        size = f"{m.total_bytes / (1 << 20):.1f} MiB"
        rows.append((m.version, marks.get(m.version, ""), m.model_id, m.source_label,
                     m.quantization_label, size, created))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def _show(args: argparse.Namespace) -> int:
    _, store = _context()
    print(store.manifest(args.version).model_dump_json(indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edgeagent.errors import CorruptArtifactError, SignatureError

    _, store = _context()
    versions = args.versions or [m.version for m in store.manifests()]
    failed = 0
    for version in versions:
        try:
            manifest = store.verify(version)
            signed = "signed" if manifest.signature else "unsigned"
            print(f"ok       {manifest.version}  {len(manifest.files)} files, {signed}")
        except CorruptArtifactError as error:
            failed += 1
            print(f"{'REFUSED' if isinstance(error, SignatureError) else 'CORRUPT'}  {error}")
    return CorruptArtifactError.exit_code if failed else 0


def _activate(args: argparse.Namespace) -> int:
    _, store = _context()
    store.verify(args.version)
    refs = store.activate(args.version)
    print(f"current {refs.current}, previous {refs.previous}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    _, store = _context()
    refs = store.rollback()
    print(f"current {refs.current}, previous {refs.previous}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    settings, store = _context()
    report = store.gc(keep=args.keep or settings.store.keep_versions)
    print(
        f"removed {len(report.removed_versions)} version(s), {report.removed_blobs} blob(s), "
        f"{report.removed_staging} abandoned staging dir(s); freed "
        f"{report.freed_bytes / (1 << 20):.1f} MiB"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from edgeagent.store.manifest import ImportSource

    _, store = _context()
    manifest = store.import_directory(
        args.directory, ImportSource(origin=str(args.directory.resolve()))
    )
    return _committed(store, manifest, args.activate)
