"""Where updates come from, as configured: the drop directory and hub polling, each a task the
daemon supervises."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from edgeagent.settings import Settings
from edgeagent.sources.fetch import HubTarget
from edgeagent.sources.prepare import hub_fetcher
from edgeagent.store.store import ModelStore
from edgeagent.updates.drop_dir import DropDirectory, take_drop
from edgeagent.updates.hub_poll import HubPoller
from edgeagent.updates.pipeline import Updater

logger = logging.getLogger(__name__)

Source = tuple[str, Callable[[], Awaitable[None]]]  # a task's name and what it runs


def update_sources(settings: Settings, store: ModelStore, updater: Updater) -> list[Source]:
    sources = list[Source]()
    if settings.updates.watch_drop_dir:
        drop = settings.drop_dir

        async def take(claimed: Path) -> None:
            await take_drop(claimed, drop, store, updater)

        directory = DropDirectory(drop, take)
        directory.prepare()
        sources.append(("drop-directory", directory.run))
        logger.info("watching %s for model updates (a directory with a READY file)", drop)
    if settings.polls_hub:
        updates = settings.updates
        poller = HubPoller(
            hub_fetcher(settings, store), HubTarget(settings.hub.repo, settings.hub.revision),
            updater, interval_s=updates.hub_poll_interval_s, jitter=updates.hub_poll_jitter,
            max_backoff_s=updates.hub_poll_max_backoff_s,
        )  # fmt: skip
        sources.append(("hub-poll", poller.run))
        logger.info("polling the hub for new commits of %s every %g s",
                    poller.target, updates.hub_poll_interval_s)  # fmt: skip
    return sources
