"""Signed model versions (issue 31, item 1): with `trust.public_keys` set, only versions whose
`model.sig` verifies with one of the keys over exactly their files are admitted, through the
drop directory and the hub (the daemon polling the loopback hub server), and served at start.

Every refusal names its reason in `edgeagent status` and the update journal, and leaves nothing
in the store: unsigned, signed by another key, a file changed after signing, a file added after
signing, a signature over other files (another model's, copied in).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hub_server import HubServer
from waits import HANG_S

from edgeagent.store.trust import SIGNATURE_FILE
from fast.fakes import Behaviour
from fast.runner import Box, in_process
from fast.signed import (
    REFUSALS,
    KeyPair,
    copy_model,
    signed_box,
    signed_model,
    tamper_consistently,
    trust_settings,
)

REFUSED = 2  # admin_pb.UPDATE_RESULT_REFUSED


@pytest.fixture
def publisher(tmp_path: Path) -> KeyPair:
    return KeyPair.make(tmp_path / "keys", "publisher")


@pytest.fixture
def box(tmp_path: Path, publisher: KeyPair) -> Box:
    """A box whose A (current) and B are signed by the publisher."""
    return signed_box(tmp_path / "box", publisher)


def _store_contents(box: Box) -> tuple[list[str], list[str], list[str]]:
    store = box.store
    return (sorted(p.name for p in store.versions.iterdir()),
            sorted(p.name for p in store.blobs.iterdir()),
            sorted(p.name for p in store.staging_root.iterdir()))  # fmt: skip


async def test_drops_are_admitted_only_when_signed_by_a_trusted_key(
    box: Box, publisher: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Each refusal case is dropped in turn: filed under failed/ with its reason, shown in
    `edgeagent status` and the journal, A still serving, the store unchanged.
    2. A version signed by the publisher is dropped: promoted, its signature in the manifest."""
    before = _store_contents(box)
    async with in_process(box, **trust_settings(publisher)) as daemon:
        for make, says in REFUSALS:
            name = make.__name__.strip("_")
            make(box.root / "incoming" / name, publisher)
            copy_model(box.root / "incoming" / name, box.drop / name)
            (box.drop / name / "READY").touch()
            filed = await box.until_filed(name)
            assert filed.parent.name == "failed", name
            assert says in (filed / "REASON").read_text(), (name, (filed / "REASON").read_text())
            status = await daemon.status()
            assert status.version == box.versions["a"].version
            last = status.history[0]
            assert (last.kind, last.version, last.result) == ("drop", name, REFUSED)
            assert says in last.reason
            assert _store_contents(box) == before, name
        good = signed_model(box.root / "incoming" / "good", publisher, Behaviour(seed=3))
        copy_model(good, box.drop / "good")
        (box.drop / "good" / "READY").touch()
        assert (await box.until_filed("good")).parent.name == "done"
        status = await daemon.status()
    journal = [(o.kind, o.version, o.result) for o in box.journal.history]
    assert journal[1:] == [("drop", m.__name__.strip("_"), "refused") for m, _ in REFUSALS][::-1]
    assert journal[0][2] == "promoted"
    promoted = box.store.manifest(status.version)
    assert promoted.signature is not None
    assert promoted.signature.checked == f"verified with {publisher.public}"
    assert promoted.signature.bundle == (good / SIGNATURE_FILE).read_text()
    assert SIGNATURE_FILE not in {f.path for f in promoted.files}
    assert all(any(says in r.message for r in caplog.records) for _, says in REFUSALS)


async def test_a_signature_is_recorded_even_when_none_is_required(tmp_path: Path) -> None:
    """No keys configured: a signed drop is admitted and its signature kept, not checked."""
    box = Box(tmp_path / "box")
    box.add("a", Behaviour(seed=1), current=True)
    stranger = KeyPair.make(tmp_path / "keys", "stranger")
    async with in_process(box):
        signed_model(box.drop / "signed", stranger, Behaviour(seed=2))
        (box.drop / "signed" / "READY").touch()
        assert (await box.until_filed("signed")).parent.name == "done"
    signature = box.store.manifest("current").signature
    assert signature is not None
    assert signature.checked == "not checked: trust.public_keys lists no key"


async def test_row_s7_start_refuses_a_tampered_stored_version_and_serves_the_previous(
    box: Box, publisher: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    """B is current; one of its files is replaced in the store together with its digest in
    the manifest (the digests check out): the start refuses B for its signature, A serves."""
    b = box.versions["b"].version
    box.store.activate(b)
    tamper_consistently(box.store, b, "fake-engine.json", b'{"seed": 99}')
    async with in_process(box, **trust_settings(publisher)) as daemon:
        assert (await daemon.generate()).model_version == box.versions["a"].version
    assert (
        f"cannot serve the current version: version {b}: fake-engine.json changed after "
        f"signing" in caplog.text
    )
    assert box.store.refs().current == b  # not moved: fixed by fetching it again


async def test_row_s7_start_refuses_an_unsigned_stored_version(
    box: Box, publisher: KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    """A version imported before signatures were required is not served once they are."""
    unsigned = box.add("unsigned", Behaviour(seed=5), current=True)
    async with in_process(box, **trust_settings(publisher)) as daemon:
        assert (await daemon.generate()).model_version == box.versions["a"].version
    assert f"version {unsigned.version} is not signed" in caplog.text


async def test_the_daemon_polling_the_hub_refuses_an_unsigned_commit_then_takes_a_signed_one(
    box: Box, publisher: KeyPair
) -> None:
    """The loopback hub (hub.endpoint) holds an unsigned commit: the poll refuses it before
    downloading anything, `edgeagent status` says why; then a signed commit is promoted."""
    with HubServer() as hub:
        repo = hub.add_repo("edge/tiny")
        unsigned = repo.commit(signed_model(box.root / "hub-unsigned", None, Behaviour(seed=7)))
        settings = {
            **trust_settings(publisher), "EDGEAGENT_HUB__ENDPOINT": hub.endpoint,
            "EDGEAGENT_HUB__REPO": "edge/tiny", "EDGEAGENT_UPDATES__HUB_POLL_INTERVAL_S": "0.2",
        }  # fmt: skip
        async with in_process(box, **settings) as daemon:
            for _ in range(int(HANG_S / 0.05)):
                history = (await daemon.status()).history
                if history:
                    break
                await asyncio.sleep(0.05)
            refused = history[0]
            assert (refused.kind, refused.version) == ("fetch", f"edge/tiny@{unsigned[:10]}")
            assert refused.result == REFUSED
            assert "is not signed: no model.sig came with its files" in refused.reason
            assert not [p for _, p, _ in hub.requests if "/resolve/" in p]
            repo.commit(signed_model(box.root / "hub-signed", publisher, Behaviour(seed=8)))
            for _ in range(int(HANG_S / 0.05)):
                status = await daemon.status()
                if status.history[0].result != REFUSED:
                    break
                await asyncio.sleep(0.05)
    assert status.history[0].result == 1  # promoted
    signature = box.store.manifest(status.version).signature
    assert signature is not None
    assert signature.checked == f"verified with {publisher.public}"


async def test_row_1s_an_update_to_an_unsigned_stored_version_is_refused_and_marked_bad(
    box: Box, publisher: KeyPair
) -> None:
    """`edgeagent update` to a version committed before signatures were required."""
    unsigned = box.add("unsigned", Behaviour(seed=5)).version
    async with in_process(box, **trust_settings(publisher)) as daemon:
        outcome = await daemon.update(unsigned)
        assert (await daemon.status()).version == box.versions["a"].version
    assert outcome.result == REFUSED
    assert outcome.reason.startswith(f"version {unsigned} is not signed (no model.sig came")
    assert box.journal.bad[unsigned] == outcome.reason
