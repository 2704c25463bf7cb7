"""Signed model versions: OpenSSF model signing (PyPI `model-signing`) with elliptic-curve keys,
fully offline (no transparency log, no certificates).

A publisher signs a model directory (`edgeagent sign --dir`, or `model_signing sign key`) and
ships the signature as `model.sig` beside the files: a Sigstore bundle whose DSSE envelope signs
an in-toto statement listing every file's sha256. Once `trust.public_keys` lists a key, a
version is admitted (hub fetch, drop directory, `edgeagent models import`) and served (start,
update) only when its signature verifies with one of those keys and names exactly its files,
with their digests. A signature is recorded in the version's manifest whenever one came with it.

model_signing checks the envelope, then compares what it signs with a list it hashes itself;
here that list is the store's: the store hashed every file as it committed it and checks the
bytes against those digests before anything is served (`store.verify`), so `_recorded_hashing`
hands model_signing the manifest's digests rather than reading gigabytes a second time.

Each refusal is a SignatureError naming its reason: unsigned; signed by another key; a
signature that does not verify (altered); files changed, added or missing since signing; a
signature over other files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeagent.errors import ConfigError, SignatureError
from edgeagent.settings import TrustSettings
from edgeagent.store.compile_cache import CACHE_FOLDER
from edgeagent.store.manifest import FileEntry, Manifest, SignatureRecord

SIGNATURE_FILE = "model.sig"  # model_signing's default name, at the model directory's root
MAX_SIGNATURE_BYTES = 4 << 20
# What signing a directory leaves out, besides git's files (as model_signing does): the
# signature itself, the drop directory's marker, huggingface_hub's local-dir cache, and the
# compile cache (kept beside the version, not one of its files: store/compile_cache.py).
UNSIGNED_PATHS = (SIGNATURE_FILE, "READY", ".cache", CACHE_FOLDER)
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
LISTED = 4  # problems named in one refusal


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    key_id: str  # sha256 of its PEM: how a model_signing signature names the key that made it


def load_public_key(path: Path) -> TrustedKey:
    """A key of `trust.public_keys`, as preflight checks it: readable, and a PEM public key on
    a curve model signing takes. ConfigError otherwise, in one line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"trust.public_keys: cannot read {path} ({error.strerror})") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = " (it is a private key: list the public one)" if b"PRIVATE KEY" in data else ""
        raise ConfigError(f"trust.public_keys: {path} is not a PEM public key{hint}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        raise ConfigError(
            f"trust.public_keys: {path} is not an elliptic-curve key on P-256, P-384 or P-521, "
            f"the keys model signing verifies"
        )
    return TrustedKey(path, public_key_id(key))


def public_key_id(key: ec.EllipticCurvePublicKey) -> str:
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def read_signature(path: Path) -> str | None:
    """The signature file's text, or None when there is none."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path.name} is larger than {MAX_SIGNATURE_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TrustPolicy:
    keys: tuple[TrustedKey, ...] = ()
    required: bool = False

    @classmethod
    def from_settings(cls, trust: TrustSettings) -> TrustPolicy:
        return cls(tuple(load_public_key(path) for path in trust.public_keys), trust.required)

    def admit(
        self, bundle: str | None, files: Sequence[FileEntry], what: str
    ) -> SignatureRecord | None:
        """At a fetch or an import: the signature to record with the version (None: it came
        unsigned). SignatureError when signatures are required and this one does not hold."""
        if bundle is None:
            if self.required:
                raise SignatureError(
                    f"{what} is not signed: no {SIGNATURE_FILE} came with its files, and "
                    f"trust.require_signature is on"
                )
            return None
        key_id = _key_id_named(bundle)
        if not self.keys:
            unchecked = "not checked: trust.public_keys lists no key"
            return SignatureRecord(bundle=bundle, key_id=key_id, checked=unchecked)
        try:
            key = self.verify(bundle, files, what)
        except SignatureError as error:
            if self.required:
                raise
            return SignatureRecord(bundle=bundle, key_id=key_id, checked=f"refused: {error}")
        return SignatureRecord(bundle=bundle, key_id=key_id, checked=f"verified with {key.path}")

    def check(self, manifest: Manifest) -> None:
        """Before a stored version is served: when signatures are required, its recorded
        signature must verify against its files' digests (which store.verify vouches for)."""
        if not self.required:
            return
        what = f"version {manifest.version}"
        if manifest.signature is None:
            raise SignatureError(
                f"{what} is not signed (no {SIGNATURE_FILE} came with it) and "
                f"trust.require_signature is on; sign it (`edgeagent sign {manifest.version} "
                f"--key KEY`) or fetch it again with its signature"
            )
        self.verify(manifest.signature.bundle, manifest.files, what)

    def precheck(self, bundle: str, what: str) -> None:
        """Before a download: a signature that is not one, or names another key, is refused at
        once (the whole check comes when every file is in)."""
        if self.required:
            self._candidates(_Signed.parse(bundle, what), what)

    def verify(self, bundle: str, files: Sequence[FileEntry], what: str) -> TrustedKey:
        """The trusted key `bundle` verifies with, over exactly `files`; else SignatureError."""
        signed = _Signed.parse(bundle, what)
        candidates = self._candidates(signed, what)
        for key in candidates:
            try:
                _verify_with(key, bundle, files)
            except InvalidSignature:
                continue
            except OSError as error:
                raise SignatureError(f"{what}: cannot read {key.path} ({error})") from None
            except ValueError as error:
                if str(error).startswith("Signature mismatch"):  # the envelope verified
                    raise SignatureError(f"{what}: {signed.differences(files)}") from None
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise SignatureError(
                    f"{what}: {SIGNATURE_FILE} cannot be checked ({first_line})"
                ) from None
            return key
        if signed.key_id:
            raise SignatureError(
                f"{what}: {SIGNATURE_FILE} does not verify with {candidates[0].path}, the key "
                f"it names: the signature or the list it signs was altered after signing"
            )
        raise SignatureError(
            f"{what}: {SIGNATURE_FILE} names no key and verifies with none of trust.public_keys"
        )

    def _candidates(self, signed: _Signed, what: str) -> list[TrustedKey]:
        if not signed.key_id:
            return list(self.keys)
        matching = [key for key in self.keys if key.key_id == signed.key_id]
        if not matching:
            trusted = ", ".join(f"{key.path} ({key.key_id[:16]})" for key in self.keys)
            raise SignatureError(
                f"{what}: {SIGNATURE_FILE} is signed by another key (key id "
                f"{signed.key_id[:16]}), not by one of trust.public_keys: {trusted}"
            )
        return matching


@dataclass(frozen=True)
class _Signed:
    """What a signature file says, read without trusting it: the key it names and the files it
    signs (trusted only once model_signing has verified the envelope)."""

    key_id: str
    resources: dict[str, str]  # path -> sha256 hex
    hashing: tuple[str, str]  # model_signing's serialization and hash: by files, sha256

    @classmethod
    def parse(cls, bundle: str, what: str) -> _Signed:
        try:
            document = json.loads(bundle)
            statement = json.loads(base64.b64decode(document["dsseEnvelope"]["payload"]))
            predicate = statement.get("predicate") or {}
            if "resources" in predicate:
                serialization_ = predicate["serialization"]
                hashing = (str(serialization_["method"]), str(serialization_["hash_type"]))
                resources = {str(r["name"]): str(r["digest"]) for r in predicate["resources"]}
            else:  # model_signing 0.2's statement: the files as subjects
                hashing = ("files", "sha256")
                resources = {str(s["name"]): str(s["digest"]["sha256"])
                             for s in statement["subject"]}  # fmt: skip
            return cls(_key_id_named(bundle), resources, hashing)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise SignatureError(
                f"{what}: {SIGNATURE_FILE} is not a model signature ({type(error).__name__}: "
                f"{error})"
            ) from None

    def differences(self, files: Sequence[FileEntry]) -> str:
        """Why a signature whose envelope verified does not cover `files`, in a line."""
        if self.hashing != ("files", "sha256"):
            return (
                f"{SIGNATURE_FILE} hashes by {self.hashing[0]} with {self.hashing[1]}; "
                f"edgeagent checks signatures made by files with sha256 (model_signing's default)"
            )
        ours, signed = {e.path: e.sha256 for e in files}, self.resources
        if not any(signed.get(path) == digest for path, digest in ours.items()):
            return (
                f"{SIGNATURE_FILE} is a signature over other files: none of the {len(signed)} "
                f"it signs is one of these {len(ours)} (another model's signature?)"
            )
        problems = [
            f"{path} changed after signing (sha256 {ours[path][:12]}…, signed {signed[path][:12]}…)"
            for path in sorted(set(ours) & set(signed))
            if ours[path] != signed[path]
        ]
        problems += [
            f"{path} was added after signing ({SIGNATURE_FILE} does not name it)"
            for path in sorted(set(ours) - set(signed))
        ]
        problems += [f"{path} is signed but missing" for path in sorted(set(signed) - set(ours))]
        more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        return "; ".join(problems[:LISTED]) + more


def signed_paths(bundle: str) -> set[str]:
    """The files a signature names (not yet verified: for deciding what to download)."""
    return set(_Signed.parse(bundle, SIGNATURE_FILE).resources)


def _key_id_named(bundle: str) -> str:
    try:
        return str(json.loads(bundle)["verificationMaterial"]["publicKey"]["hint"] or "")
    except (ValueError, KeyError, TypeError):
        return ""


def _verify_with(key: TrustedKey, bundle: str, files: Sequence[FileEntry]) -> None:
    """model_signing's own verification of `bundle` with `key`, over `files`' digests."""
    from model_signing import verifying  # 0.4 s of imports (sigstore's): only when needed

    with tempfile.TemporaryDirectory(prefix="edgeagent-signature-") as scratch:
        signature = Path(scratch) / SIGNATURE_FILE
        signature.write_text(bundle)
        config = verifying.Config().use_elliptic_key_verifier(public_key=key.path)
        config.set_hashing_config(_recorded_hashing(files, "model"))
        config.verify(scratch, signature)


def sign_directory(model_dir: Path, private_key: Path, output: Path) -> str:
    """Sign every file under `model_dir` but git's and UNSIGNED_PATHS (and `output`, when it is
    inside) with model_signing's own hashing; write the signature to `output`. Returns the
    signing key's id."""
    from model_signing import hashing, signing

    ignored = [*UNSIGNED_PATHS]
    if output.resolve().is_relative_to(model_dir.resolve()):
        ignored.append(str(output.resolve().relative_to(model_dir.resolve())))
    key_id = _check_private_key(private_key)
    config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(
        hashing.Config().set_ignored_paths(paths=ignored).set_allow_symlinks(True)
    )
    config.sign(model_dir, output)
    return key_id


def sign_files(files: Sequence[FileEntry], name: str, private_key: Path, output: Path) -> str:
    """Sign `files` as their digests say (a stored version's, checked against the bytes just
    before); write the signature to `output`. Returns the signing key's id."""
    from model_signing import signing

    key_id = _check_private_key(private_key)
    config = signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(_recorded_hashing(files, name))
    config.sign(output.parent, output)
    return key_id


def _check_private_key(path: Path) -> str:
    """The id of the public half of a signing key; ConfigError naming what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"--key {path}: cannot read it ({error.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            f"--key {path} is encrypted; `model_signing sign key --password` signs with it"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"--key {path} is not a PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in CURVES:
        raise ConfigError(f"--key {path} is not an elliptic-curve key on P-256, P-384 or P-521")
    return public_key_id(key.public_key())


def _recorded_hashing(files: Sequence[FileEntry], name: str) -> Any:
    """A model_signing hashing configuration whose `hash` is the store's sha256 of each file,
    serialized as model_signing's default (file by file, sha256)."""
    from model_signing import hashing, manifest
    from model_signing._hashing.hashing import Digest

    serialization_ = manifest.SerializationType.from_args(
        {"method": "files", "hash_type": "sha256", "allow_symlinks": True,
         "ignore_paths": [*UNSIGNED_PATHS, ".git", ".gitattributes", ".github", ".gitignore"]}
    )  # fmt: skip
    items = [
        serialization_.new_item(entry.path, Digest("sha256", bytes.fromhex(entry.sha256)))
        for entry in files
    ]

    class Recorded(hashing.Config):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]

        def hash(self, model_path: Any, *, files_to_hash: Any = None) -> Any:
            return manifest.Manifest(name, items, serialization_)

    return Recorded()
