"""Signed versions for the tests: key pairs the tests make (ECDSA P-256), fake models signed as
a publisher signs them, a box whose versions are signed, and the trust settings that require
it. The signatures are model_signing's own (`edgeagent.store.trust.sign_directory`)."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeagent.store.manifest import FileEntry, ImportSource, Manifest, sha256_of
from edgeagent.store.store import ModelStore
from edgeagent.store.trust import SIGNATURE_FILE, sign_directory
from fast.fakes import Behaviour, make_fake_model
from fast.runner import Box


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path

    @classmethod
    def make(cls, directory: Path, name: str) -> KeyPair:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pair = cls(directory / f"{name}.key", directory / f"{name}.pub")
        pair.private.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))  # fmt: skip
        pair.public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ))  # fmt: skip
        return pair


def trust_settings(*keys: KeyPair) -> dict[str, str]:
    """The daemon's settings that admit only versions signed by `keys`."""
    return {"EDGEAGENT_TRUST__PUBLIC_KEYS": json.dumps([str(k.public) for k in keys])}


def signed_model(out: Path, key: KeyPair | None, behaviour: Behaviour, **model: Any) -> Path:
    """A fake model directory with its `model.sig` (none when `key` is None)."""
    make_fake_model(out, behaviour, **model)
    if key is not None:
        sign_directory(out, key.private, out / SIGNATURE_FILE)
    return out


def signed_box(root: Path, key: KeyPair) -> Box:
    """A box whose store has A (current) and B, both signed by `key` (committed by a store
    that checks nothing: the signature is recorded as it came)."""
    box = Box(root)
    for name, seed in (("a", 1), ("b", 2)):
        source = signed_model(root / "sources" / name, key, Behaviour(seed=seed))
        box.versions[name] = box.store.import_directory(source, ImportSource(origin=str(source)))
    box.store.activate(box.versions["a"].version)
    return box


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def tamper_consistently(store: ModelStore, version: str, path: str, content: bytes) -> None:
    """Replace a stored file's bytes and its digest in the manifest alike, as someone with
    write access to the store could: the digests check out; only the signature can tell."""
    manifest_path = store.versions / version / "manifest.json"
    manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    staged = store.blobs / "tampered"
    staged.write_bytes(content)
    sha256 = sha256_of(staged)
    staged.rename(store.blobs / sha256)
    link = store.model_dir(version) / path
    link.unlink()
    link.symlink_to(os.path.relpath(store.blobs / sha256, link.parent))
    files = [
        FileEntry(path=e.path, sha256=sha256, size=len(content)) if e.path == path else e
        for e in manifest.files
    ]
    manifest = manifest.model_copy(update={"files": files})
    os.chmod(manifest_path, 0o644)
    manifest_path.write_text(manifest.model_dump_json(indent=2))


def _unsigned(out: Path, publisher: KeyPair) -> Path:
    return signed_model(out, None, Behaviour(seed=11))


def _another_key(out: Path, publisher: KeyPair) -> Path:
    return signed_model(out, KeyPair.make(out.parent / "keys", "stranger"), Behaviour(seed=12))


def _changed(out: Path, publisher: KeyPair) -> Path:
    signed_model(out, publisher, Behaviour(seed=13))
    (out / "config.json").write_text((out / "config.json").read_text() + "\n")
    return out


def _added(out: Path, publisher: KeyPair) -> Path:
    signed_model(out, publisher, Behaviour(seed=14))
    (out / "extra.json").write_text('{"added": "after signing"}')
    return out


def _other_files(out: Path, publisher: KeyPair) -> Path:
    """Another model's signature, by the trusted key, copied beside these files."""
    other = signed_model(out.parent / "other-model", publisher, Behaviour(seed=9),
                         weight_bytes=8192, num_hidden_layers=2)  # fmt: skip
    signed_model(out, None, Behaviour(seed=15))
    shutil.copyfile(other / SIGNATURE_FILE, out / SIGNATURE_FILE)
    return out


def _removed(out: Path, publisher: KeyPair) -> Path:
    signed_model(out, publisher, Behaviour(seed=16))
    (out / "fake-engine.json").unlink()
    return out


def _altered(out: Path, publisher: KeyPair) -> Path:
    """The list the signature signs edited: one digest replaced, the envelope kept."""
    signed_model(out, publisher, Behaviour(seed=17))
    bundle = json.loads((out / SIGNATURE_FILE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (out / SIGNATURE_FILE).write_text(json.dumps(bundle))
    return out


Make = Callable[[Path, KeyPair], Path]
# Each refusal: how such a model directory is made, and what its refusal says.
REFUSALS: list[tuple[Make, str]] = [
    (_unsigned, "is not signed: no model.sig came with its files"),
    (_another_key, "model.sig is signed by another key (key id "),
    (_changed, "config.json changed after signing (sha256 "),
    (_added, "extra.json was added after signing (model.sig does not name it)"),
    (_other_files, "model.sig is a signature over other files: none of the 3 it signs is one"),
    (_removed, "fake-engine.json is signed but missing"),
    (_altered, "the signature or the list it signs was altered after signing"),
]
