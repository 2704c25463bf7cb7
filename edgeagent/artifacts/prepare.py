"""Which stored version the daemon serves, acquiring one when the store is empty.

Startup serves `current` after verifying it. A current version that fails verification is not
loaded; `previous` is tried instead, loudly. An empty store is filled from the configured
source: the hub repo and revision, or the embedded tiny model built with AutoRound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edgeagent.artifacts.build import build_embedded
from edgeagent.artifacts.fetch import HubFetcher, HubTarget
from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.errors import CorruptArtifactError, NoServableVersionError, NotFoundError
from edgeagent.settings import GiB, Settings

logger = logging.getLogger(__name__)


def open_store(settings: Settings) -> ModelStore:
    return ModelStore(settings.models_dir, min_free_bytes=int(settings.store.min_free_gib * GiB))


def hub_fetcher(settings: Settings, store: ModelStore) -> HubFetcher:
    return HubFetcher(
        store,
        endpoint=settings.hub.endpoint,
        token=settings.hub_token_value,
        offline=settings.hub.offline,
    )


def model_to_serve(
    settings: Settings,
    store: ModelStore,
    cancel: threading.Event | None = None,
    refuse: Callable[[Manifest], str | None] = lambda manifest: None,
) -> Manifest:
    """The verified version to load; acquires and activates one if the store has none.

    `refuse` is the caller's own test (the daemon's fit check): a reason not to load it.
    """
    if store.refs().current is None:
        manifest = acquire_default(settings, store, cancel)
        store.activate(manifest.version)
    full = settings.store.verify_on_start == "full"
    failures = []
    for ref in ("current", "previous"):
        try:
            manifest = store.verify(ref, full=full)
        except (CorruptArtifactError, NotFoundError) as error:
            failures.append(str(error))
            logger.error("cannot serve the %s version: %s", ref, error)
            continue
        if (reason := refuse(manifest)) is None:
            return manifest
        failures.append(f"version {manifest.version}: {reason}")
        logger.error("cannot serve the %s version %s: %s", ref, manifest.version, reason)
    raise NoServableVersionError(
        "no servable version: " + "; ".join(failures) + ". Fetch or build one that fits "
        "(`edgeagent fetch`, `edgeagent fit`), then `edgeagent models verify`"
    )


def acquire_default(
    settings: Settings, store: ModelStore, cancel: threading.Event | None = None
) -> Manifest:
    if settings.model.source == "embedded":
        logger.info("the store is empty: building the embedded model with AutoRound")
        return build_embedded(store, cancel)
    target = HubTarget(settings.hub.repo, settings.hub.revision)
    logger.info("the store is empty: fetching %s", target)
    return hub_fetcher(settings, store).fetch(target)
