"""`edgeagent sign`: sign a stored version, or a model directory before publishing it, with an
elliptic-curve private key (docs/signing.md). The signature is OpenSSF model signing's, the one
`model_signing sign key` makes; `trust.public_keys` on the edge boxes verifies it."""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any


def add_commands(commands: Any) -> None:
    sign = commands.add_parser(
        "sign", help="sign a stored version, or a model directory to publish (model.sig)"
    )
    sign.add_argument("version", nargs="?", help="a stored version (id, prefix, current)")
    sign.add_argument("--dir", type=Path, help="sign this model directory instead of a version")
    sign.add_argument("--key", type=Path, required=True, help="PEM elliptic-curve private key")
    sign.add_argument(
        "--output", type=Path, help="where to write the signature; default DIR/model.sig with "
        "--dir; a version's is recorded in the store, and written here only if given",
    )  # fmt: skip
    sign.set_defaults(handler=_sign)


def _sign(args: argparse.Namespace) -> int:
    from edgeagent.errors import ConfigError
    from edgeagent.settings import Settings
    from edgeagent.store import trust

    if (args.version is None) == (args.dir is None):
        raise ConfigError("sign: name a stored VERSION or --dir MODEL_DIR (one of the two)")
    settings = Settings()
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.dir is not None:
        if not args.dir.is_dir():
            raise ConfigError(f"--dir {args.dir}: not a directory")
        output = args.output or args.dir / trust.SIGNATURE_FILE
        key_id = trust.sign_directory(args.dir, args.key, output)
        print(f"signed {args.dir} with key {key_id[:16]}: {output}")
        return 0
    return _sign_version(settings, args.version, args.key, args.output)


def _sign_version(settings: Any, version: str, key: Path, output: Path | None) -> int:
    """Check the version's bytes against its manifest, sign its digests, and record the
    signature (as trust, where configured, finds it); then write it out if asked."""
    from edgeagent.store import trust
    from edgeagent.store.store import ModelStore, open_store

    store = open_store(settings)
    policy = store.trust
    # Its files are checked as they are; whether it is admitted is what signing changes.
    manifest = ModelStore(store.root).verify(version)
    with tempfile.TemporaryDirectory(prefix="edgeagent-sign-") as scratch:
        made = Path(scratch) / trust.SIGNATURE_FILE
        key_id = trust.sign_files(manifest.files, manifest.model_id, key, made)
        bundle = made.read_text()
        record = policy.admit(bundle, manifest.files, f"version {manifest.version}")
        assert record is not None
        store.record_signature(manifest.version, record)
        if output is not None:
            shutil.copyfile(made, output)
    print(f"signed version {manifest.version} with key {key_id[:16]} ({record.checked})")
    if output is not None:
        print(f"wrote {output}")
    return 0
