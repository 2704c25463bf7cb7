"""The model store on a real file system: commit, refs, verify, gc, disk checks, startup choice."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from waits import HANG_S

from edgeagent.errors import (
    CorruptArtifactError,
    InsufficientDiskError,
    NotFoundError,
    UnavailableError,
)
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import Expected, ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _import(store: ModelStore, model: Path) -> str:
    return store.import_directory(model, ImportSource(origin=str(model))).version


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_commit_makes_a_verified_read_only_version(store: ModelStore, tiny_fp16: Path) -> None:
    version = _import(store, tiny_fp16)
    manifest = store.manifest(version)
    model = store.model_dir(version)

    assert sorted(f.path for f in manifest.files) == sorted(p.name for p in tiny_fp16.iterdir())
    for entry in manifest.files:
        link = model / entry.path
        assert link.is_symlink()
        assert link.read_bytes() == (tiny_fp16 / entry.path).read_bytes()
        assert link.resolve().stat().st_mode & 0o777 == 0o444
    arch = manifest.architecture
    assert (arch.architectures, arch.num_hidden_layers, arch.num_key_value_heads) == (
        ["Phi3ForCausalLM"], 4, 2,
    )  # fmt: skip
    assert arch.head_dim == 64
    assert arch.weight_bytes > 0
    assert manifest.quantization is None
    assert list((store.root / "staging").iterdir()) == []
    store.verify(version)


def test_same_bytes_are_one_version_and_blobs_are_shared(
    store: ModelStore, tiny_fp16: Path, tiny_fp16_b: Path
) -> None:
    a = _import(store, tiny_fp16)
    assert _import(store, tiny_fp16) == a
    b = _import(store, tiny_fp16_b)
    assert b != a
    blobs = len(list(store.blobs.iterdir()))
    files = len(store.manifest(a).files) + len(store.manifest(b).files)
    assert blobs < files  # tokenizer and config files are shared, weights are not


def test_the_engine_sees_every_version_at_one_path(
    store: ModelStore, tiny_fp16: Path, tiny_fp16_b: Path
) -> None:
    """vLLM's compile cache is keyed on the model's path: one path for every version."""
    a, b = _import(store, tiny_fp16), _import(store, tiny_fp16_b)
    link = store.root.parent / "cache" / "served-model"
    path_a = store.link_model(a, link)
    assert path_a.resolve() == store.model_dir(a).resolve()
    assert (path_a / "model.safetensors").read_bytes() == (
        tiny_fp16 / "model.safetensors"
    ).read_bytes()
    path_b = store.link_model(b, link)
    assert path_b == path_a
    assert path_b.resolve() == store.model_dir(b).resolve()
    assert [p.name for p in link.parent.iterdir()] == ["served-model"]


def test_activate_and_rollback_switch_current_and_previous(
    store: ModelStore, tiny_fp16: Path, tiny_fp16_b: Path
) -> None:
    a, b = _import(store, tiny_fp16), _import(store, tiny_fp16_b)
    with pytest.raises(NotFoundError):
        store.rollback()
    store.activate(a)
    refs = store.activate(b[:6])  # a unique prefix names a version
    assert (refs.current, refs.previous) == (b, a)
    refs = store.rollback()
    assert (refs.current, refs.previous) == (a, b)
    assert json.loads((store.root / "refs.json").read_text()) == {"current": a, "previous": b}
    with pytest.raises(NotFoundError, match="no version"):
        store.activate("ffff")


def test_corrupt_file_is_found_moved_aside_and_healed(store: ModelStore, tiny_fp16: Path) -> None:
    version = _import(store, tiny_fp16)
    weights = store.model_dir(version) / "model.safetensors"
    _flip_byte(weights.resolve())
    with pytest.raises(CorruptArtifactError, match=r"model.safetensors: sha256"):
        store.verify(version)
    assert not weights.exists()  # its blob was moved aside, so nothing can load it
    with pytest.raises(CorruptArtifactError, match="missing"):
        store.verify(version, full=False)
    assert _import(store, tiny_fp16) == version  # the same bytes again heal the version
    store.verify(version)


def test_truncated_weights_are_refused_at_commit(
    store: ModelStore, tiny_fp16: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp16, broken)
    with (broken / "model.safetensors").open("r+b") as file:
        file.truncate(file.seek(0, os.SEEK_END) - 100)
    with pytest.raises(CorruptArtifactError, match="header describes"):
        _import(store, broken)
    assert store.manifests() == []
    assert list(store.blobs.iterdir()) == []


def test_digest_mismatch_with_the_source_is_refused(store: ModelStore, tiny_fp16: Path) -> None:
    with store.staging("download") as staged:
        shutil.copy(tiny_fp16 / "config.json", staged / "config.json")
        expected = {"config.json": Expected(size=(staged / "config.json").stat().st_size,
                                            git_sha1="0" * 40)}  # fmt: skip
        with pytest.raises(CorruptArtifactError, match="git blob id"):
            store.commit(staged, ImportSource(origin="x"), expected)
        assert not (staged / "config.json").exists()  # removed so a retry downloads it again


def test_gc_keeps_current_previous_and_the_newest(
    store: ModelStore, tiny_fp16: Path, tiny_fp16_b: Path, tmp_path: Path
) -> None:
    third = tmp_path / "third"
    shutil.copytree(tiny_fp16, third)
    (third / "extra.json").write_text("{}")
    a, b = _import(store, tiny_fp16), _import(store, tiny_fp16_b)
    c = _import(store, third)
    store.activate(a)
    store.activate(b)  # current b, previous a; c is the newest
    abandoned = store.staging_root / "fetch-abandoned"
    abandoned.mkdir()
    (abandoned / "model.safetensors.part").write_bytes(b"x" * 1000)
    with store.staging("fetch-running") as running:
        (running / "part").write_bytes(b"y")
        report = store.gc(keep=0)
        assert running.exists()  # held by a live fetch
    assert report.removed_versions == [c]
    assert report.removed_staging == 1
    assert report.removed_blobs == 1  # extra.json; c's other files are a's
    assert {m.version for m in store.manifests()} == {a, b}
    store.verify(a)
    store.verify(b)
    assert not abandoned.exists()


def test_disk_check_names_the_numbers(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models", min_free_bytes=1 << 60)
    with pytest.raises(InsufficientDiskError, match=r"needs 1.0 MiB .* must stay free"):
        store.ensure_free(1 << 20, "fetching x")


def test_staging_refuses_a_second_worker(store: ModelStore) -> None:
    with (
        store.staging("fetch-x"),
        pytest.raises(UnavailableError, match="already working"),
        store.staging("fetch-x"),
    ):
        pass


def test_lock_file_is_a_real_lock(store: ModelStore) -> None:
    with (
        store.locked(),
        (store.root / ".lock").open("a") as other,
        pytest.raises(BlockingIOError),
    ):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cli_reports_through_exit_codes(tmp_path: Path, tiny_fp16: Path) -> None:
    env = {
        **os.environ,
        "EDGEAGENT_CONFIG": str(tmp_path / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(tmp_path / "state"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edgeagent", *args],
            env=env, capture_output=True, text=True, timeout=HANG_S, check=False,
        )  # fmt: skip

    imported = cli("models", "import", str(tiny_fp16))
    assert imported.returncode == 0, imported.stderr
    version = imported.stdout.strip()
    assert cli("models", "rollback").returncode == 4
    assert cli("models", "show", "nope").returncode == 4
    listing = cli("models", "list").stdout
    assert version in listing
    assert "current" in listing
    assert cli("models", "verify").returncode == 0
    store = ModelStore(tmp_path / "state" / "models")
    _flip_byte((store.model_dir(version) / "tokenizer.json").resolve())
    corrupt = cli("models", "verify", version)
    assert corrupt.returncode == 5
    assert "CORRUPT" in corrupt.stdout
