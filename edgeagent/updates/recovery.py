"""At start, settle a change the last daemon did not finish, before anything is loaded.

The journal's `pending` record says how far the change got. The rule (Mender's, for a device
that reboots mid-update): until the new version has served through its probation, a daemon that
died unexpectedly counts against it. So an update interrupted while loading, promoting or in
probation is undone (the store's current goes back to the version before, the candidate is
marked bad, so no source retries it in a loop); one interrupted before loading changed nothing.
An operator's rollback or an automatic rollback is completed instead: its target is the known
good version. A probation left by an orderly shutdown resumes for the time it had left.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edgeagent.store.store import ModelStore
from edgeagent.updates.journal import Pending, Result, UpdateJournal, UpdateOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumedProbation:
    version: str
    fallback: str
    left_s: float
    promoted_s_ago: float


def settle_interrupted(journal: UpdateJournal, store: ModelStore) -> ResumedProbation | None:
    """Settle `journal.pending`; a probation to resume, if the last daemon stopped in order."""
    pending = journal.pending
    if pending is None:
        return None
    now = time.time()
    if pending.step == "probation" and pending.stopped_cleanly:
        if pending.probation_until > now:
            journal.resumed()
            logger.info("resuming the probation of %s", pending.version)
            return ResumedProbation(
                pending.version,
                pending.from_version,
                pending.probation_until - now,
                now - pending.started_at,
            )
        logger.info("%s passed its probation while the daemon was stopped", pending.version)
        journal.end_probation()
        return None
    outcome, bad = _settlement(pending, store, now)
    journal.record(outcome, bad=bad)
    logger.warning("%s to %s: %s (%s)", outcome.kind, outcome.version, outcome.result,
                   outcome.reason)  # fmt: skip
    return None


def _settlement(
    pending: Pending, store: ModelStore, now: float
) -> tuple[UpdateOutcome, tuple[str, str] | None]:
    """What the interrupted change comes to, with the store put in line with it; and the
    version to mark bad, with why."""
    died = f"the daemon died while {_DOING[pending.step]} ({now - pending.started_at:.0f} s in)"
    if pending.kind != "update":  # a rollback's target is the known good version: finish it
        if store.refs().current != pending.version:
            store.activate(pending.version)
        return _outcome(pending, "promoted", f"completed at start: {died}"), None
    if pending.step in ("staged", "verified"):
        reason = f"{died}; nothing had changed: {pending.from_version} serves"
        return _outcome(pending, "interrupted", reason), None
    if store.refs().current == pending.version:
        store.activate(pending.from_version)
    reason, bad = f"{died}; {pending.from_version} serves again", (pending.version, died)
    if pending.step == "probation":
        return UpdateOutcome("auto_rollback", pending.from_version, pending.version, "promoted",
                             reason), bad  # fmt: skip
    return _outcome(pending, "rolled_back", reason), bad


_DOING = {
    "staged": "about to verify it",
    "verified": "about to load it",
    "loading": "loading and smoke-testing it",
    "promoting": "promoting it",
    "probation": "it was on probation",
}


def _outcome(pending: Pending, result: Result, reason: str) -> UpdateOutcome:
    return UpdateOutcome(pending.kind, pending.version, pending.from_version, result, reason)
