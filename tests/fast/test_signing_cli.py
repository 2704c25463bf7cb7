"""`edgeagent sign` and the trust settings as an operator meets them: a signature made by
`edgeagent sign` verifies with model_signing's own CLI and the other way round; a stored
version signed with `edgeagent sign VERSION` passes `edgeagent models verify` until a file is
tampered with; bad keys are named (the settings' own checks are test_cli.py's rows).

`edgeagent` runs in this process (its `main`, as `python -m edgeagent` calls it: seconds saved
on the fast tier); `model_signing` as the command it is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from edgeagent.cli import main
from edgeagent.errors import ConfigError, SignatureError
from edgeagent.settings import TrustSettings
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore
from edgeagent.store.trust import SIGNATURE_FILE, TrustPolicy, load_public_key, sign_files
from fast.fakes import Behaviour
from fast.runner import Box
from fast.signed import KeyPair, signed_model, tamper_consistently, trust_settings


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


Run = Callable[..., Ran]


def _model_signing(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_signing", *args], env=dict(os.environ),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def edgeagent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`edgeagent ARGS` with `env` added to the environment; its SIGTERM handler undone."""

    def run(*args: str, env: dict[str, str] | None = None) -> Ran:
        handler = signal.getsignal(signal.SIGTERM)
        capsys.readouterr()
        with monkeypatch.context() as environment:
            for name, value in (env or {}).items():
                environment.setenv(name, value)
            try:
                code = main(list(args))
            finally:
                signal.signal(signal.SIGTERM, handler)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


@pytest.fixture
def publisher(tmp_path: Path) -> KeyPair:
    return KeyPair.make(tmp_path / "keys", "publisher")


def test_edgeagent_sign_dir_verifies_with_model_signing_and_the_other_way_round(
    tmp_path: Path, publisher: KeyPair, edgeagent: Run
) -> None:
    """1. `edgeagent sign --dir` writes model.sig; `model_signing verify key` accepts it.
    2. `model_signing sign key` signs another directory; `edgeagent models import` admits it
    where the publisher's key is required, and records the signature."""
    ours = signed_model(tmp_path / "ours", None, Behaviour(seed=1))
    (ours / "READY").touch()  # a drop's marker is not signed
    signed = edgeagent("sign", "--dir", str(ours), "--key", str(publisher.private))
    assert signed.returncode == 0, signed.stderr
    assert f"{ours / SIGNATURE_FILE}" in signed.stdout
    verified = _model_signing("verify", "key", str(ours), "--signature",
                              str(ours / SIGNATURE_FILE), "--public_key", str(publisher.public),
                              "--ignore-paths", str(ours / "READY"))  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert "Verification succeeded" in verified.stdout

    theirs = signed_model(tmp_path / "theirs", None, Behaviour(seed=2))
    made = _model_signing("sign", "key", str(theirs), "--private_key", str(publisher.private),
                          "--signature", str(theirs / SIGNATURE_FILE))  # fmt: skip
    assert made.returncode == 0, made.stderr
    box = Box(tmp_path / "box")
    env = {**box.environment(), **trust_settings(publisher)}
    imported = edgeagent("models", "import", str(theirs), env=env)
    assert imported.returncode == 0, imported.stderr
    signature = box.store.manifest(imported.stdout.strip()).signature
    assert signature is not None
    assert signature.checked == f"verified with {publisher.public}"


def test_edgeagent_sign_version_is_recorded_and_checked_by_models_verify(
    tmp_path: Path, publisher: KeyPair, edgeagent: Run
) -> None:
    """1. A version imported unsigned is signed: `edgeagent sign VERSION --output F` records
    the signature and writes it to F, and model_signing verifies F over the store's directory.
    2. `models verify` passes where the key is required. 3. A file and its digest replaced in
    the store: `models verify` refuses it (exit 5), naming the file."""
    box = Box(tmp_path / "box")
    version = box.add("a", Behaviour(seed=1), current=True).version
    env = {**box.environment(), **trust_settings(publisher)}
    output = tmp_path / "published.sig"
    signed = edgeagent("sign", version, "--key", str(publisher.private), "--output",
                       str(output), env=env)  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    assert f"signed version {version} with key " in signed.stdout
    assert f"(verified with {publisher.public})" in signed.stdout
    signature = box.store.manifest(version).signature
    assert signature is not None
    assert signature.bundle == output.read_text()
    library = _model_signing("verify", "key", str(box.store.model_dir(version)),
                             "--signature", str(output), "--public_key", str(publisher.public),
                             "--allow_symlinks")  # fmt: skip
    assert library.returncode == 0, library.stderr

    after = edgeagent("models", "verify", version, env=env)
    assert after.returncode == 0, after.stdout
    assert f"ok       {version}  3 files, signed" in after.stdout

    tamper_consistently(box.store, version, "config.json", b'{"model_type": "other"}')
    tampered = edgeagent("models", "verify", version, env=env)
    assert tampered.returncode == 5
    assert f"REFUSED  version {version}: config.json changed after signing" in tampered.stdout


def test_signing_with_a_key_the_box_does_not_trust_is_refused(
    tmp_path: Path, publisher: KeyPair, edgeagent: Run
) -> None:
    box = Box(tmp_path / "box")
    version = box.add("a", Behaviour(seed=1)).version
    stranger = KeyPair.make(tmp_path / "keys", "stranger")
    env = {**box.environment(), **trust_settings(publisher)}
    signed = edgeagent("sign", version, "--key", str(stranger.private), env=env)
    assert signed.returncode == 5
    assert "is signed by another key" in signed.stderr
    assert box.store.manifest(version).signature is None
    with pytest.raises(ConfigError, match=r"is not a PEM private key$"):  # exit 2
        sign_files(box.versions["a"].files, "a", publisher.public, tmp_path / "never.sig")
    assert not (tmp_path / "never.sig").exists()


def test_an_unsigned_directory_is_refused_by_models_import(
    tmp_path: Path, publisher: KeyPair, edgeagent: Run
) -> None:
    box = Box(tmp_path / "box")
    unsigned = signed_model(tmp_path / "unsigned", None, Behaviour(seed=1))
    imported = edgeagent("models", "import", str(unsigned),
                         env={**box.environment(), **trust_settings(publisher)})  # fmt: skip
    assert imported.returncode == 5
    assert "is not signed: no model.sig came with its files" in imported.stderr
    assert list(box.store.versions.iterdir()) == []
    assert list(box.store.blobs.iterdir()) == []


def test_require_signature_defaults_to_on_once_a_key_is_listed(publisher: KeyPair) -> None:
    assert not TrustSettings().required
    assert TrustSettings(public_keys=[publisher.public]).required
    assert not TrustSettings(public_keys=[publisher.public], require_signature=False).required
    with pytest.raises(ValidationError, match="lists no key, so no version could ever be"):
        TrustSettings(require_signature=True)


def test_a_key_that_is_not_an_elliptic_curve_public_key_is_refused(
    tmp_path: Path, publisher: KeyPair
) -> None:
    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )  # fmt: skip
    cases = [
        (publisher.private, "is not a PEM public key (it is a private key: list the public one)"),
        (rsa_key, "is not an elliptic-curve key on P-256, P-384 or P-521"),
        (tmp_path, "cannot read"),
    ]
    for path, says in cases:
        with pytest.raises(ConfigError, match=r"^trust\.public_keys: ") as refused:
            load_public_key(path)
        assert says in str(refused.value)
    assert load_public_key(publisher.public).key_id  # the good one loads


def test_a_signed_directory_keeps_its_signature_out_of_the_version(
    tmp_path: Path, publisher: KeyPair
) -> None:
    """model.sig is recorded in the manifest, not stored as one of the version's files: the
    same files signed or not are the same version."""
    box = Box(tmp_path / "box")
    unsigned = box.add("a", Behaviour(seed=1))
    source = signed_model(tmp_path / "signed", publisher, Behaviour(seed=1))
    signed = box.store.import_directory(source, ImportSource(origin=str(source)))
    assert signed.version == unsigned.version
    assert signed.signature is not None
    assert box.store.manifest(unsigned.version).signature == signed.signature


def test_a_signature_made_by_shards_is_refused_as_such(tmp_path: Path, publisher: KeyPair) -> None:
    """model_signing can also sign a model shard by shard: edgeagent checks per-file sha256."""
    from model_signing import hashing, signing

    source = signed_model(tmp_path / "sharded", None, Behaviour(seed=1))
    config = signing.Config().use_elliptic_key_signer(private_key=publisher.private)
    config.set_hashing_config(hashing.Config().use_shard_serialization(shard_size=1024))
    config.sign(source, source / SIGNATURE_FILE)
    store = Box(tmp_path / "box").store
    trusted = TrustPolicy((load_public_key(publisher.public),), required=True)
    with pytest.raises(SignatureError, match=r"model\.sig hashes by shards with sha256; edgeagent"):
        ModelStore(store.root, trust=trusted).import_directory(source, ImportSource(origin="x"))
