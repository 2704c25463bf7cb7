"""What updates did: each outcome, and the versions marked bad, kept across restarts.

A candidate that failed verification, its smoke test or its probation is marked bad so that no
source (the drop directory, hub polling) retries it in a loop after a restart; the history is
what `edgeagent status` shows. Both live in one small JSON file beside the model store,
replaced atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from edgeagent.artifacts.durable import write_durably

logger = logging.getLogger(__name__)

HISTORY = 20
Kind = Literal["update", "rollback", "auto_rollback"]
Result = Literal["promoted", "refused", "rolled_back"]
Method = Literal["", "reload", "restart"]


@dataclass(frozen=True)
class UpdateOutcome:
    """One update, rollback or automatic rollback. Times in seconds."""

    kind: Kind
    version: str
    from_version: str
    result: Result
    reason: str = ""
    method: Method = ""  # in place ("reload") or with a new engine ("restart")
    verify_s: float = 0.0
    pause_s: float = 0.0  # new requests held
    reload_s: float = 0.0  # the reload or the restart
    smoke_s: float = 0.0
    finished_at: float = field(default_factory=time.time)


class UpdateJournal:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self.history: deque[UpdateOutcome] = deque(maxlen=HISTORY)
        self.bad: dict[str, str] = {}
        if path is not None and path.is_file():
            self._load(path)

    def record(self, outcome: UpdateOutcome) -> None:
        self.history.appendleft(outcome)
        self._save()

    def mark_bad(self, version: str, reason: str) -> None:
        self.bad[version] = reason
        self._save()

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            self.bad = {str(k): str(v) for k, v in data.get("bad", {}).items()}
            self.history.extend(UpdateOutcome(**entry) for entry in data.get("history", []))
        except (ValueError, TypeError) as error:  # an old or damaged file must not stop serving
            logger.warning("ignoring the unreadable update journal %s: %s", path, error)

    def _save(self) -> None:
        if self._path is None:
            return
        data = {"bad": self.bad, "history": [asdict(o) for o in self.history]}
        write_durably(self._path, json.dumps(data, indent=1).encode())
