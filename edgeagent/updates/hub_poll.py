"""Hub polling as an update source: every interval (with jitter, so a fleet does not poll in
step), ask the hub which commit the configured revision names; a new one is fetched into the
store and updated to through the pipeline. Failures back off exponentially up to a ceiling.

A commit already serving, already handled, or stored as a version marked bad is not fetched or
tried again; nor is one refused for its signature (in `edgeagent status` with the reason), until
the daemon restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading

from edgeagent.errors import EdgeAgentError, SignatureError
from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.updates.journal import UpdateOutcome
from edgeagent.updates.pipeline import Updater

logger = logging.getLogger(__name__)


class HubPoller:
    def __init__(
        self,
        fetcher: HubFetcher,
        target: HubTarget,
        updater: Updater,
        *,
        interval_s: float,
        jitter: float = 0.1,
        max_backoff_s: float = 6 * 3600,
        rng: random.Random | None = None,
    ) -> None:
        self._fetcher, self.target, self._updater = fetcher, target, updater
        self._interval_s, self._jitter, self._max_backoff_s = interval_s, jitter, max_backoff_s
        self._rng = rng or random.Random()
        self._cancel = threading.Event()
        self._handled_commit: str | None = None
        self.failures = 0

    def next_delay_s(self) -> float:
        """The interval, doubled for each failure in a row up to the ceiling, ± jitter."""
        base = min(
            self._interval_s * 2.0 ** min(self.failures, 32),
            max(self._max_backoff_s, self._interval_s),
        )
        spread: float = self._rng.uniform(1 - self._jitter, 1 + self._jitter)
        return base * spread

    async def run(self) -> None:
        """Poll until cancelled (the daemon cancels the task at shutdown)."""
        self._cancel = threading.Event()  # a fresh one each run: the last run's was set
        try:
            while True:
                await asyncio.sleep(self.next_delay_s())
                await self.poll_once()
        finally:
            self._cancel.set()  # stops a fetch running on its thread within one chunk

    async def poll_once(self) -> UpdateOutcome | None:
        """One look at the hub; the update's outcome when there was something new."""
        try:
            outcome = await self._poll()
        except EdgeAgentError as error:
            self.failures += 1
            logger.warning(
                "hub poll of %s failed (%d in a row; next in about %.0f s): %s",
                self.target, self.failures, self.next_delay_s(), error,
            )  # fmt: skip
            return None
        self.failures = 0
        return outcome

    async def _poll(self) -> UpdateOutcome | None:
        commit = await asyncio.to_thread(self._fetcher.resolve, self.target)
        if commit == self._handled_commit:
            return None
        stored = self._fetcher.store.find_hub_version(self.target.repo, commit)
        serving = self._updater.serving_version
        bad = self._updater.journal.bad
        if stored is not None and (stored.version == serving or stored.version in bad):
            self._handled_commit = commit
            return None
        logger.info("%s moved to commit %s: fetching it", self.target, commit)
        pinned = HubTarget(self.target.repo, commit)
        try:
            manifest = await asyncio.to_thread(self._fetcher.fetch, pinned, self._cancel)
        except SignatureError as refused:
            self._handled_commit = commit
            logger.warning("hub commit %s refused: %s", commit, refused)
            self._updater.note_refused("fetch", f"{self.target.repo}@{commit[:10]}", str(refused))
            return None
        self._handled_commit = commit
        if manifest.version == serving:
            return None
        return await self._updater.update(manifest.version)
