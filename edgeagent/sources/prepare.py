"""Filling an empty store from the configured source: the hub repo and revision, or the embedded
tiny model built with AutoRound; and the hub fetcher as the settings describe it. (Which stored
version is served is the daemon's choice: `current`, else `previous`.)
"""

from __future__ import annotations

import logging
import threading

from edgeagent.settings import Settings
from edgeagent.sources.build import build_embedded
from edgeagent.sources.fetch import HubFetcher, HubTarget
from edgeagent.sources.hub_download import RetryPolicy
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore

logger = logging.getLogger(__name__)


def hub_fetcher(settings: Settings, store: ModelStore) -> HubFetcher:
    hub = settings.hub
    policy = RetryPolicy(attempts=hub.retries, max_wait_s=hub.max_retry_wait_s,
                         timeout_s=hub.timeout_s)  # fmt: skip
    return HubFetcher(store, endpoint=hub.endpoint, token=settings.hub_token_value,
                      offline=hub.offline, policy=policy)  # fmt: skip


def acquire_default(
    settings: Settings, store: ModelStore, cancel: threading.Event | None = None
) -> Manifest:
    if settings.model.source == "embedded":
        logger.info("the store is empty: training the embedded model, then AutoRound")
        return build_embedded(store, settings.cache_dir, cancel)
    target = HubTarget(settings.hub.repo, settings.hub.revision)
    logger.info("the store is empty: fetching %s", target)
    return hub_fetcher(settings, store).fetch(target)
