"""What updates did, what one is doing now, and the versions marked bad, kept across restarts.

An update writes where it is (`pending`: staged, verified, loading, promoting, probation) before
each step, so a daemon that was killed knows at its next start what it was doing and settles it
(`updates/recovery.py`). A candidate that failed verification, its smoke test or its probation
is marked bad so that no source (the drop directory, hub polling) retries it in a loop after a
restart; the history is what `edgeagent status` shows. All of it lives in one small JSON file
beside the model store, replaced atomically, so each write is all or nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from edgeagent.store.durable import write_durably

logger = logging.getLogger(__name__)

HISTORY = 20
Kind = Literal["update", "rollback", "auto_rollback", "drop", "fetch"]
Result = Literal["promoted", "refused", "rolled_back", "failed", "interrupted"]
Method = Literal["", "reload", "copy", "restart", "beside"]
Step = Literal["staged", "verified", "loading", "promoting", "probation"]


@dataclass(frozen=True)
class UpdateOutcome:
    """One update, rollback or automatic rollback, or a drop or hub fetch refused before it
    became an update (kind "drop": `version` is the drop's name; "fetch": REPO@COMMIT). Times
    in seconds.

    Results: promoted (the version serves); refused (nothing changed); rolled_back (loaded,
    failed, the old version put back); failed (the old version could not be put back either:
    nothing served until the daemon restarted); interrupted (the daemon stopped before anything
    changed)."""

    kind: Kind
    version: str
    from_version: str
    result: Result
    reason: str = ""
    # in place: from disk ("reload") or copied in from host memory where it was staged before
    # the pause ("copy"); a new engine after the old one ("restart") or beside it ("beside")
    method: Method = ""
    verify_s: float = 0.0
    pause_s: float = 0.0  # new requests held
    reload_s: float = 0.0  # the reload or the restart
    smoke_s: float = 0.0
    gate_s: float = 0.0  # the quality gate's scoring of the candidate, inside the pause in place
    finished_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Pending:
    """The change under way, as far as it got. Times are wall-clock (they outlive the process)."""

    kind: Kind
    version: str
    from_version: str
    step: Step
    started_at: float = field(default_factory=time.time)
    probation_until: float = 0.0  # step "probation": an engine death before this rolls back
    stopped_cleanly: bool = False  # the daemon shut down in order during the probation


class UpdateJournal:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self.history: deque[UpdateOutcome] = deque(maxlen=HISTORY)
        self.bad: dict[str, str] = {}
        self.pending: Pending | None = None
        if path is not None and path.is_file():
            self._load(path)

    def begin(
        self, kind: Kind, version: str, from_version: str, bad: tuple[str, str] | None = None
    ) -> None:
        """A change starts (and, for an automatic rollback, the version it leaves is bad)."""
        self.pending = Pending(kind, version, from_version, "staged")
        if bad is not None:
            self.bad[bad[0]] = bad[1]
        self._save()

    def advance(self, step: Step) -> None:
        if self.pending is not None:
            self.pending = replace(self.pending, step=step)
            self._save()

    def record(
        self,
        outcome: UpdateOutcome,
        *,
        bad: tuple[str, str] | None = None,
        probation_until: float | None = None,
    ) -> None:
        """Add `outcome` to the history, mark a version bad (`bad`: version, why) if given, and
        end the pending change, or (`probation_until`) keep it as a probation: one write."""
        self.history.appendleft(outcome)
        if bad is not None:
            version, why = bad
            self.bad[version] = why
        if probation_until is not None and self.pending is not None:
            self.pending = replace(self.pending, step="probation", probation_until=probation_until)
        else:
            self.pending = None
        self._save()

    def mark_bad(self, version: str, reason: str) -> None:
        self.bad[version] = reason
        self._save()

    def end_probation(self) -> None:
        if self.pending is not None and self.pending.step == "probation":
            self.pending = None
            self._save()

    def stopped_cleanly(self) -> None:
        """The daemon is shutting down in order: a probation resumes at the next start."""
        if self.pending is not None and self.pending.step == "probation":
            self.pending = replace(self.pending, stopped_cleanly=True)
            self._save()

    def resumed(self) -> None:
        if self.pending is not None and self.pending.stopped_cleanly:
            self.pending = replace(self.pending, stopped_cleanly=False)
            self._save()

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            self.bad = {str(k): str(v) for k, v in data.get("bad", {}).items()}
            self.history.extend(UpdateOutcome(**entry) for entry in data.get("history", []))
            if data.get("pending"):
                self.pending = Pending(**data["pending"])
        except (ValueError, TypeError) as error:  # an old or damaged file must not stop serving
            logger.warning("ignoring the unreadable update journal %s: %s", path, error)

    def _save(self) -> None:
        if self._path is None:
            return
        data = {
            "bad": self.bad,
            "history": [asdict(o) for o in self.history],
            "pending": asdict(self.pending) if self.pending else None,
        }
        write_durably(self._path, json.dumps(data, indent=1).encode())
