"""Fetching through huggingface_hub from a real hub-compatible server on loopback.

The server (hub_server.py) speaks the hub's HTTP API; huggingface_hub is not patched. The
CLI runs as a real process where exit codes, credentials or a kill matter.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from safetensors.torch import save_file
from waits import HANG_S, wait_until

from edgeagent.errors import (
    CorruptArtifactError,
    HubUnreachableError,
    InsufficientDiskError,
    NotFoundError,
)
from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.store.manifest import HubSource, ImportSource
from edgeagent.store.store import ModelStore

TOKEN = "hf_test_token_5f0c9a"
MiB = 1 << 20


@pytest.fixture(scope="module")
def hub(tiny_model: Path, tiny_fp16: Path) -> Iterator[HubServer]:
    with HubServer(tokens={TOKEN}) as server:
        server.add_repo("edgeagent/tiny-gptq").commit(tiny_model)
        server.add_repo("org/gated", gated=True).commit(tiny_fp16)
        server.add_repo("org/private", private=True).commit(tiny_model)
        yield server


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory, tiny_fp16: Path) -> Path:
    """24 MiB of weights: huggingface_hub writes downloads in 10 MiB chunks, so a kill or a
    full disk can land after a chunk is on disk."""
    model = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(tiny_fp16, model)
    save_file({"padding": torch.zeros(6 * MiB)}, str(model / "model.safetensors"))
    return model


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "state" / "models")


def _downloads(hub: HubServer, path_part: str = "/resolve/") -> list[tuple[str, str | None]]:
    return [
        (path, rng) for method, path, rng in hub.requests if method == "GET" and path_part in path
    ]


def test_fetch_records_the_resolved_commit_and_skips_what_it_has(
    hub: HubServer, store: ModelStore, tiny_model: Path
) -> None:
    fetcher = HubFetcher(store, endpoint=hub.endpoint)
    manifest = fetcher.fetch(HubTarget.parse("edgeagent/tiny-gptq"))

    assert manifest.source == HubSource(
        repo="edgeagent/tiny-gptq", revision="main", endpoint=hub.endpoint,
        commit=hub.repos["edgeagent/tiny-gptq"].refs["main"],
    )  # fmt: skip
    assert manifest.quantization_label == "gptq 4-bit g128 sym"
    for entry in manifest.files:
        assert (store.model_dir(manifest.version) / entry.path).read_bytes() == (
            tiny_model / entry.path
        ).read_bytes()
    before = len(_downloads(hub))
    assert fetcher.fetch(HubTarget.parse("edgeagent/tiny-gptq@main")) == manifest
    assert len(_downloads(hub)) == before


def test_new_revision_tag_and_pinned_commit(
    hub: HubServer, store: ModelStore, tiny_fp16: Path, tiny_fp16_b: Path
) -> None:
    repo = hub.add_repo("org/evolving")
    first = repo.commit(tiny_fp16)
    repo.refs["v1.0"] = first
    fetcher = HubFetcher(store, endpoint=hub.endpoint)
    v1 = fetcher.fetch(HubTarget.parse("org/evolving"))

    second = repo.commit(tiny_fp16_b)
    v2 = fetcher.fetch(HubTarget.parse("org/evolving"))
    assert v2.version != v1.version
    assert (v1.source.commit, v2.source.commit) == (first, second)  # type: ignore[union-attr]
    assert fetcher.fetch(HubTarget.parse(f"org/evolving@{first[:10]}")).version == v1.version
    assert fetcher.fetch(HubTarget.parse("org/evolving@v1.0")).version == v1.version


def test_interrupted_download_resumes_where_it_stopped(
    hub: HubServer, store: ModelStore, big_model: Path, tmp_path: Path
) -> None:
    """1. A slow download. 2. The fetch process is SIGKILLed mid-file.
    3. The store is unchanged. 4. The next fetch asks only for the missing bytes."""
    hub.add_repo("org/slow").commit(big_model)
    hub.bytes_per_s = 8 * MiB
    try:
        with _start_cli(["fetch", "org/slow"], hub, tmp_path) as process:
            part = _wait_for_part(store, "model.safetensors.part", at_least=MiB, process=process)
            process.send_signal(signal.SIGKILL)
            process.wait()
    finally:
        hub.bytes_per_s = None
    kept = part.stat().st_size
    assert store.manifests() == []
    assert store.refs().current is None

    manifest = HubFetcher(store, endpoint=hub.endpoint).fetch(HubTarget.parse("org/slow"))
    store.verify(manifest.version)
    ranges = [rng for path, rng in _downloads(hub, "org/slow/resolve") if "safetensors" in path]
    assert ranges[-1] == f"bytes={kept}-", ranges


def test_corrupt_file_is_refused_and_only_it_is_fetched_again(
    hub: HubServer, store: ModelStore, tiny_fp16: Path
) -> None:
    hub.add_repo("org/flaky").commit(tiny_fp16)
    hub.corrupt.add(("org/flaky", "model.safetensors"))
    fetcher = HubFetcher(store, endpoint=hub.endpoint)
    with pytest.raises(CorruptArtifactError, match=r"model.safetensors: sha256 .* refused"):
        fetcher.fetch(HubTarget.parse("org/flaky"))
    assert store.manifests() == []

    hub.corrupt.clear()
    fetcher.fetch(HubTarget.parse("org/flaky"))
    fetched = [path.rsplit("/", 1)[-1] for path, _ in _downloads(hub, "org/flaky/resolve")]
    assert fetched.count("model.safetensors") == 2
    assert fetched.count("config.json") == 1


def test_a_file_finished_by_an_interrupted_fetch_is_hashed_at_the_commit(
    hub: HubServer, store: ModelStore, tiny_fp16: Path
) -> None:
    """Downloaded bytes are hashed once, as they arrive; a file an earlier process finished
    was not hashed by this one, so the commit reads it: one altered on disk since is caught."""
    commit = hub.add_repo("org/resumed").commit(tiny_fp16)
    staged = store.staging_root / f"fetch-org--resumed-{commit}"
    staged.mkdir(parents=True)
    weights = (tiny_fp16 / "model.safetensors").read_bytes()
    (staged / "model.safetensors").write_bytes(bytes(len(weights)))  # right size, other bytes
    with pytest.raises(CorruptArtifactError, match=r"model.safetensors: sha256 .* refused"):
        HubFetcher(store, endpoint=hub.endpoint).fetch(HubTarget.parse("org/resumed"))
    assert store.manifests() == []

    manifest = HubFetcher(store, endpoint=hub.endpoint).fetch(HubTarget.parse("org/resumed"))
    store.verify(manifest.version)


def test_missing_repo_and_revision_are_not_found(hub: HubServer, store: ModelStore) -> None:
    fetcher = HubFetcher(store, endpoint=hub.endpoint)
    with pytest.raises(NotFoundError, match="no such repo"):
        fetcher.fetch(HubTarget.parse("org/nothing"))
    with pytest.raises(NotFoundError, match="no revision 'v9'"):
        fetcher.fetch(HubTarget.parse("edgeagent/tiny-gptq@v9"))


def test_gated_and_private_repos_need_a_token(hub: HubServer, tmp_path: Path) -> None:
    refused = _run_cli(["fetch", "org/gated"], hub, tmp_path)
    assert refused.returncode == 7
    assert "is gated" in refused.stderr
    assert _run_cli(["fetch", "org/private"], hub, tmp_path).returncode == 4

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "hub_token").write_text(TOKEN)
    for repo in ("org/gated", "org/private"):
        allowed = _run_cli(["fetch", repo], hub, tmp_path, CREDENTIALS_DIRECTORY=str(credentials))
        assert allowed.returncode == 0, allowed.stderr
        assert TOKEN not in allowed.stdout + allowed.stderr
    listing = _run_cli(["models", "list"], hub, tmp_path)
    assert "org/gated@" in listing.stdout
    assert "org/private@" in listing.stdout


def test_offline_mode_serves_from_the_store(hub: HubServer, store: ModelStore) -> None:
    online = HubFetcher(store, endpoint=hub.endpoint).fetch(HubTarget.parse("edgeagent/tiny-gptq"))
    requests = len(hub.requests)
    offline = HubFetcher(store, endpoint=hub.endpoint, offline=True)
    assert offline.fetch(HubTarget.parse("edgeagent/tiny-gptq")) == online
    commit = online.source.commit  # type: ignore[union-attr]
    assert offline.fetch(HubTarget.parse(f"edgeagent/tiny-gptq@{commit}")) == online
    assert len(hub.requests) == requests
    with pytest.raises(HubUnreachableError, match="offline mode: the store has no version"):
        offline.fetch(HubTarget.parse("org/other"))


def test_unreachable_hub_is_a_clear_error(store: ModelStore) -> None:
    fetcher = HubFetcher(store, endpoint="http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(HubUnreachableError, match="cannot reach the hub"):
        fetcher.fetch(HubTarget.parse("org/any"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs: a real file system that fills up."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_refuses_or_stops_and_leaves_current_serving(
    hub: HubServer, small_disk: Path, tiny_model: Path, big_model: Path
) -> None:
    """1. A current version on a 40 MiB disk. 2. A 24 MiB fetch that would leave less than
    the required headroom is refused up front. 3. With less headroom required it starts, and
    another process fills the disk mid-download: a clear error, and what the fetch had
    written is removed. 4. Current still verifies; with space freed, the fetch completes."""
    store = ModelStore(small_disk / "models", min_free_bytes=20 * MiB)
    current = store.import_directory(tiny_model, ImportSource(origin="current")).version
    store.activate(current)
    hub.add_repo("org/big").commit(big_model)
    target = HubTarget.parse("org/big")
    with pytest.raises(InsufficientDiskError, match="must stay free"):
        HubFetcher(store, endpoint=hub.endpoint).fetch(target)

    store.min_free_bytes = 4 * MiB
    filler = small_disk / "filler"
    hub.bytes_per_s = 8 * MiB
    try:
        errors: list[BaseException] = []
        fetching = threading.Thread(target=_fetch_into, args=(store, hub, target, errors))
        fetching.start()
        _wait_for_part(store, "model.safetensors.part", at_least=MiB)
        _fill(filler)
        fetching.join(timeout=HANG_S)
        assert not fetching.is_alive(), "hang guard: the fetch neither failed nor finished"
    finally:
        hub.bytes_per_s = None
    assert len(errors) == 1, errors
    assert isinstance(errors[0], InsufficientDiskError), errors
    assert list(store.staging_root.rglob("*.part")) == []
    assert store.refs().current == current
    store.verify("current")

    filler.unlink()
    resumed = HubFetcher(store, endpoint=hub.endpoint).fetch(target)
    store.verify(resumed.version)


def _fetch_into(
    store: ModelStore, hub: HubServer, target: HubTarget, errors: list[BaseException]
) -> None:
    try:
        HubFetcher(store, endpoint=hub.endpoint).fetch(target)
    except BaseException as error:
        errors.append(error)


def _fill(path: Path) -> None:
    with path.open("wb") as file:
        try:
            while True:
                file.write(b"\0" * MiB)
                file.flush()
        except OSError:
            pass


def _wait_for_part(
    store: ModelStore, name: str, at_least: int, process: subprocess.Popen[str] | None = None
) -> Path:
    def grown() -> Path | None:
        for part in store.staging_root.glob(f"*/{name}"):
            if part.stat().st_size >= at_least:
                return part
        if process is not None and process.poll() is not None:
            raise AssertionError(f"fetch exited early: {process.communicate()}")
        return None

    return wait_until(f"a {name} of {at_least} bytes in staging", grown, every_s=0.02)


def _cli_env(hub: HubServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "CREDENTIALS_DIRECTORY"}
    return {
        **env,
        "EDGEAGENT_CONFIG": str(tmp_path / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(tmp_path / "state"),
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        **extra,
    }


def _start_cli(args: list[str], hub: HubServer, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeagent", *args], env=_cli_env(hub, tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _run_cli(
    args: list[str], hub: HubServer, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], env=_cli_env(hub, tmp_path, **env),
        capture_output=True, text=True, timeout=HANG_S, check=False,
    )  # fmt: skip
