"""Signed versions fetched from the loopback hub (`tests/hub_server.py`, at the fetcher's
endpoint as `hub.endpoint` sets it): each refusal names its reason and removes the staged
download; nothing reaches the store. An unsigned repo is refused before any download, and one
signed by another key before its weights are downloaded. A signed repo is admitted with every
file its signature names, the signature recorded in the manifest."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import HubServer

from edgeagent.errors import SignatureError
from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore
from edgeagent.store.trust import SIGNATURE_FILE, TrustPolicy, load_public_key
from fast.fakes import Behaviour
from fast.signed import REFUSALS, KeyPair, Make, signed_model

REPO = "edge/tiny"


@dataclass
class Hub:
    server: HubServer
    store: ModelStore
    root: Path
    publisher: KeyPair

    def publish(self, model_dir: Path) -> str:
        return self.server.repos[REPO].commit(model_dir)

    def fetch(self, revision: str = "main") -> Manifest:
        fetcher = HubFetcher(self.store, endpoint=self.server.endpoint)
        return fetcher.fetch(HubTarget(REPO, revision))

    def downloads(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for m, p, _ in self.server.requests
                if m == "GET" and "/resolve/" in p]  # fmt: skip


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    """An empty store that requires the publisher's signature, and an empty repo on the hub."""
    publisher = KeyPair.make(tmp_path / "keys", "publisher")
    trust = TrustPolicy((load_public_key(publisher.public),), required=True)
    store = ModelStore(tmp_path / "state" / "models", trust=trust)
    with HubServer() as server:
        server.add_repo(REPO)
        yield Hub(server, store, tmp_path, publisher)


@pytest.mark.parametrize(
    ("make", "says"), REFUSALS, ids=[m.__name__.strip("_") for m, _ in REFUSALS]
)
def test_a_hub_version_that_fails_its_signature_is_refused_and_its_download_removed(
    hub: Hub, make: Make, says: str
) -> None:
    commit = hub.publish(make(hub.root / "published", hub.publisher))
    with pytest.raises(SignatureError) as refused:
        hub.fetch()
    assert str(refused.value).startswith(f"{REPO}@{commit[:10]}")
    assert says in str(refused.value)
    assert list(hub.store.versions.iterdir()) == []
    assert list(hub.store.blobs.iterdir()) == []
    assert list(hub.store.staging_root.iterdir()) == []  # the keyed download is not kept
    if make.__name__ == "_unsigned":
        assert hub.downloads() == []  # refused on the listing alone
    if make.__name__ == "_another_key":
        assert hub.downloads() == [SIGNATURE_FILE]  # before any weights


def test_a_signed_hub_version_is_admitted_with_every_file_it_signs(hub: Hub) -> None:
    """The signature also names a model card, which the fetch would otherwise leave out."""
    published = hub.root / "published"
    published.mkdir()
    (published / "README.md").write_text("# tiny\nA model card the publisher signed.\n")
    signed_model(published, hub.publisher, Behaviour(seed=2))
    hub.publish(published)
    manifest = hub.fetch()
    assert {f.path for f in manifest.files} == {
        "README.md", "config.json", "fake-engine.json", "model.safetensors",
    }  # fmt: skip
    assert manifest.signature is not None
    assert manifest.signature.checked == f"verified with {hub.publisher.public}"
    assert manifest.signature.bundle == (published / SIGNATURE_FILE).read_text()
    assert hub.store.verify(manifest.version) == hub.store.manifest(manifest.version)
    assert hub.fetch() == hub.store.manifest(manifest.version)  # stored, and still admitted


def test_a_stored_unsigned_version_is_fetched_again_for_its_signature(hub: Hub) -> None:
    """The same commit was fetched by a box that required nothing, and its signature was not
    recorded (a version from before signing): a fetch requiring it gets the signature too."""
    published = signed_model(hub.root / "published", hub.publisher, Behaviour(seed=2))
    hub.publish(published)
    relaxed = ModelStore(hub.store.root)
    fetched = HubFetcher(relaxed, endpoint=hub.server.endpoint).fetch(HubTarget(REPO))
    manifest_path = relaxed.versions / fetched.version / "manifest.json"
    manifest_path.write_text(fetched.model_copy(update={"signature": None}).model_dump_json())
    refetched = hub.fetch()
    assert refetched.version == fetched.version
    assert refetched.signature is not None
    assert refetched.signature.checked == f"verified with {hub.publisher.public}"
