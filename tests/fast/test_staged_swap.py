"""In-place updates staged in host memory (issue 28): the pause is one copy, putting the old
version back is one copy, and a host without room for two copies reloads from disk, saying so.
The fake engine keeps which weights were copied in and which were reloaded from disk."""

from __future__ import annotations

from edgeagent.engine.placement import staging_verdict
from edgeagent.fit import GiB
from fast.fakes import Behaviour
from fast.runner import Box, in_process

PROMOTED, ROLLED_BACK = 1, 3
IN_PLACE = {"EDGEAGENT_UPDATES__SWAP": "in_place"}


async def test_an_update_is_copied_in_and_a_refused_one_goes_back_by_one_copy(box: Box) -> None:
    box.add("worse", Behaviour(seed=3, prompt_logprob=-3.0))  # the gate refuses it
    a, b, worse = (box.versions[v] for v in ("a", "b", "worse"))
    async with in_process(box, **IN_PLACE) as daemon:
        said = (await daemon.status()).next_swap
        promoted = await daemon.update(b.version)
        refused = await daemon.update(worse.version)
        back = await daemon.rollback()
        reply = await daemon.generate()
        engine = daemon.engine
    assert said.startswith("in place: updates.swap is in_place; staged copy: 2 x "), said
    assert (promoted.result, promoted.method) == (PROMOTED, "copy"), promoted
    assert (refused.result, refused.method) == (ROLLED_BACK, "copy"), refused
    assert "quality gate refused" in refused.reason
    assert promoted.gate_s > 0  # inside the pause, and reported
    assert refused.gate_s > 0
    assert back.gate_s == 0  # an operator's rollback is not gated
    assert (back.result, back.method) == (PROMOTED, "copy"), back
    assert reply.model_version == a.version
    dirs = [box.store.model_dir(v.version).resolve() for v in (b, worse, b, a)]
    assert engine.copies_in == dirs  # b in; worse in, b back (one copy); a back by the rollback
    assert engine.copies_in == engine.reloads  # nothing was read from disk in a pause
    assert set(engine.staged) <= {a.version, b.version, worse.version}
    assert len(engine.staged) == 2  # the serving version and one other, never more


async def test_a_host_without_room_for_two_copies_reloads_from_disk_and_says_why(
    box: Box,
) -> None:
    async with in_process(box, **IN_PLACE, EDGEAGENT_UPDATES__HOST_RESERVE_GIB="1000000") as daemon:
        said = (await daemon.status()).next_swap
        outcome = await daemon.update(box.versions["b"].version)
        engine = daemon.engine
    assert "reloaded from disk: staging needs" in said, said
    assert "GiB kept free" in said
    assert (outcome.result, outcome.method) == (PROMOTED, "reload"), outcome
    assert engine.copies_in == []
    assert engine.staged == {}


async def test_a_candidate_that_cannot_be_staged_is_reloaded_from_disk(box: Box) -> None:
    """Staging fails as the reload would (the fake's processing error): the update goes on
    with the reload from disk, which fails inside the pause and puts the old version back."""
    box.add("broken", Behaviour(seed=4, reload_error="bad tensor shape"))
    async with in_process(box, **IN_PLACE) as daemon:
        outcome = await daemon.update(box.versions["broken"].version)
        reply = await daemon.generate()
    assert (outcome.result, outcome.method) == (ROLLED_BACK, "reload"), outcome
    assert "bad tensor shape" in outcome.reason
    assert reply.model_version == box.versions["a"].version


def test_staging_needs_two_copies_of_the_weights_beside_the_reserve() -> None:
    fits, why = staging_verdict(True, 8 * GiB, 0, 20 * GiB, 2 * GiB)
    assert fits
    assert why.startswith("staged copy: 2 x 8.00 GiB"), why
    fits, why = staging_verdict(True, 8 * GiB, 0, 17 * GiB, 2 * GiB)
    assert not fits
    assert "needs 16.00 GiB more" in why, why
    fits, _ = staging_verdict(True, 8 * GiB, 16 * GiB, 3 * GiB, 2 * GiB)  # both staged already
    assert fits
    assert staging_verdict(False, 1, 0, 100 * GiB, 0) == (
        False, "updates.stage_in_host_memory is off",
    )  # fmt: skip
