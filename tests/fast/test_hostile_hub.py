"""Fetching from a hub that lies or misbehaves (the loopback hub server's hostile mode).

Every case fails with a clear error, writes nothing outside the fetch's staging directory,
leaves the store's versions and refs as they were, and leaves no partial version behind.
Busy answers (429, 503) are retried after Retry-After; other errors are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import HubServer

from edgeagent.errors import (
    AccessDeniedError,
    CorruptArtifactError,
    EdgeAgentError,
    HubUnreachableError,
    NotFoundError,
)
from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.sources.hub_download import RetryPolicy
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore
from fast.fakes import Behaviour, make_fake_model

REPO = "edge/tiny"
QUICK = RetryPolicy(attempts=3, first_wait_s=0.05, max_wait_s=5.0, timeout_s=0.5)
SHA256_OF_NOTHING = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass
class Hub:
    server: HubServer
    store: ModelStore
    root: Path
    commit: str

    def fetch(self, revision: str = "main") -> None:
        fetcher = HubFetcher(self.store, endpoint=self.server.endpoint, policy=QUICK)
        fetcher.fetch(HubTarget(REPO, revision))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """A store serving version A; the hub's main holds version B."""
    store = ModelStore(tmp_path / "state" / "models")
    a = make_fake_model(tmp_path / "sources" / "a", Behaviour(seed=1))
    store.activate(store.import_directory(a, ImportSource(origin=str(a))).version)
    b = make_fake_model(tmp_path / "sources" / "b", Behaviour(seed=2), weight_bytes=3 << 20)
    with HubServer() as server:
        commit = server.add_repo(REPO).commit(b)
        yield Hub(server, store, tmp_path, commit)


def _tree(root: Path) -> dict[str, int]:
    """Every file under root (staging aside) with its size: what a fetch must not change."""
    staging = root / "state" / "models" / "staging"
    return {
        str(path.relative_to(root)): path.lstat().st_size
        for path in root.rglob("*")
        if not path.is_dir() and not path.is_relative_to(staging)
    }


def _refused(hub: Hub, error: type[EdgeAgentError], says: str, revision: str = "main") -> str:
    """The fetch fails with `error` saying `says`; nothing outside staging changed."""
    before, refs = _tree(hub.root), hub.store.refs()
    versions = sorted(p.name for p in hub.store.versions.iterdir())
    with pytest.raises(error) as refused:
        hub.fetch(revision)
    assert says in str(refused.value), refused.value
    assert _tree(hub.root) == before
    assert hub.store.refs() == refs
    assert sorted(p.name for p in hub.store.versions.iterdir()) == versions
    return str(refused.value)


def _lfs_entry(path: str, sha256: str = SHA256_OF_NOTHING) -> dict[str, object]:
    return {"type": "file", "oid": "0" * 40, "size": 0, "path": path,
            "lfs": {"oid": sha256, "size": 0, "pointerSize": 134}}  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        pytest.param(_lfs_entry("../../../escaped/model.safetensors"), "'.' or '..'", id="dotdot"),
        pytest.param(_lfs_entry("weights/../../refs.json"), "'.' or '..'", id="dotdot-inside"),
        pytest.param(_lfs_entry("/ABSOLUTE/outside.safetensors"), "absolute path", id="absolute"),
        pytest.param(_lfs_entry("refs.json"), "the store uses", id="refs"),
        pytest.param(_lfs_entry("manifest.json"), "the store uses", id="manifest"),
        pytest.param(_lfs_entry("model.safetensors.part"), "the store uses", id="part-suffix"),
        pytest.param(_lfs_entry(".cache/x.safetensors"), "hidden name", id="hidden"),
        pytest.param(_lfs_entry("w\\..\\..\\x.safetensors"), "backslashes", id="backslash"),
        pytest.param(
            _lfs_entry("model-2.safetensors", sha256="../../../../etc/passwd"),
            "not 64 hex",
            id="lfs-sha256-as-a-path",
        ),
        pytest.param(
            {"type": "symlink", "oid": "1" * 40, "path": "weights"},
            "folder with no files",
            id="symlink",
        ),
        pytest.param({**_lfs_entry("config.json")}, "same file twice", id="duplicate"),
        pytest.param({**_lfs_entry("big.safetensors"), "size": -1}, "with size -1", id="size"),
    ],
)
def test_a_listing_with_a_hostile_entry_is_refused_whole(
    hub: Hub, entry: dict[str, object], says: str
) -> None:
    """The entry is listed beside the real files; before the fix, `..` and absolute names were
    joined onto staging and written outside it, and the LFS sha256 was used as a blob path."""
    if str(entry["path"]).startswith("/ABSOLUTE"):
        entry = {**entry, "path": str(hub.root / "outside.safetensors")}
    hub.server.hostile.extra_tree.append(entry)
    _refused(hub, CorruptArtifactError, says)
    assert not (hub.root / "outside.safetensors").exists()
    assert not any(hub.root.rglob("escaped"))
    downloads = [p for m, p, _ in hub.server.requests if "/resolve/" in p]
    assert downloads == []  # refused before a byte was fetched


def test_a_commit_id_of_another_form_is_refused(hub: Hub) -> None:
    hub.server.hostile.sha = "../../not-a-commit"
    _refused(hub, CorruptArtifactError, "not a 40-hex id")


def test_a_pinned_commit_that_resolves_elsewhere_is_refused(hub: Hub) -> None:
    hub.server.hostile.sha = "f" * 40
    _refused(hub, CorruptArtifactError, f"pinned commit {hub.commit} resolved to", hub.commit)


@pytest.mark.parametrize(
    ("body", "error", "says"),
    [
        pytest.param("longer", CorruptArtifactError, "longer than the", id="longer"),
        pytest.param("endless", CorruptArtifactError, "longer than the", id="endless"),
        pytest.param("shorter", HubUnreachableError, "after 3 attempts", id="shorter"),
        pytest.param("stall", HubUnreachableError, "ReadTimeout", id="stall"),
    ],
)
def test_a_body_unlike_its_listing_is_refused(
    hub: Hub, body: str, error: type[EdgeAgentError], says: str
) -> None:
    hub.server.hostile.bodies["model.safetensors"] = body  # type: ignore[assignment]
    started = time.monotonic()
    _refused(hub, error, says)
    assert time.monotonic() - started < 10


def test_a_body_whose_sha256_differs_from_its_lfs_pointer_is_refused_and_deleted(
    hub: Hub,
) -> None:
    hub.server.corrupt.add((REPO, "model.safetensors"))
    _refused(hub, CorruptArtifactError, "the hub lists")
    assert list(hub.store.staging_root.rglob("model.safetensors*")) == []


def test_a_redirect_loop_is_a_clear_error(hub: Hub) -> None:
    hub.server.hostile.redirect_loop = True
    _refused(hub, HubUnreachableError, "redirect loop")


@pytest.mark.parametrize(
    ("status", "error", "says"),
    [
        pytest.param(401, AccessDeniedError, "refused access (401)", id="401"),
        pytest.param(403, AccessDeniedError, "refused access (403)", id="403"),
        pytest.param(404, NotFoundError, "404", id="404"),
        pytest.param(500, HubUnreachableError, "answered 500", id="500"),
    ],
)
def test_errors_are_not_retried(
    hub: Hub, status: int, error: type[EdgeAgentError], says: str
) -> None:
    hub.server.hostile.answers = [(status, {})] * 3
    _refused(hub, error, says)
    assert len(hub.server.requests) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_busy_answers_are_retried_after_retry_after(hub: Hub, status: int) -> None:
    """A busy answer with `Retry-After: 1`, then the hub serves: the fetch waits about a second
    and completes."""
    hub.server.hostile.answers = [(status, {"Retry-After": "1"})]
    started = time.monotonic()
    hub.fetch()
    assert time.monotonic() - started >= 1
    assert hub.store.find_hub_version(REPO, hub.commit) is not None


def test_a_retry_after_beyond_the_limit_is_not_waited_for(hub: Hub) -> None:
    hub.server.hostile.answers = [(429, {"Retry-After": "86400"})]
    started = time.monotonic()
    _refused(hub, HubUnreachableError, "more than the 5 s edgeagent waits")
    assert time.monotonic() - started < 2


def test_the_cli_refuses_an_escaping_listing_in_one_line(hub: Hub) -> None:
    """As first reported: a tree listing an absolute path and a `..` path made `edgeagent
    fetch` write outside staging before failing. Now: one line, exit 5, nothing written."""
    hub.server.hostile.extra_tree += [
        _lfs_entry(str(hub.root / "x" / "model.safetensors")),
        _lfs_entry("../../../escaped/model.safetensors"),
    ]
    env = {
        **os.environ, "EDGEAGENT_CONFIG": str(hub.root / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(hub.root / "state"), "HF_ENDPOINT": hub.server.endpoint,
    }  # fmt: skip
    before = _tree(hub.root)
    result = subprocess.run(
        [sys.executable, "-m", "edgeagent", "fetch", REPO], env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "refusing the listing" in errors[0]
    assert _tree(hub.root) == before
    assert not (hub.root / "x").exists()
