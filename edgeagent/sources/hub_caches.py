"""The compile caches a hub repo carries (`compile-cache/<keyid>/`, store/compile_cache.py).

They are optional and fetched after the version is committed: each cache's `cache.json` first,
then, for a cache made on a machine like this one (same device, driver and software; the engine
settings are checked when an engine starts), the files it lists, each verified against the hub's
digests as it arrives like any other file, and again against `cache.json` when it is stored.
A cache that fails anywhere is logged and left out; the version stays as fetched.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx2
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile

from edgeagent.errors import EdgeAgentError
from edgeagent.store.compile_cache import (
    CACHE_FOLDER,
    CACHE_MANIFEST,
    FILES,
    KEYID,
    caches_allowed,
    read_manifest,
    take_compile_caches,
)
from edgeagent.store.compile_key import BoxFacts, box_differences
from edgeagent.store.store import ModelStore

logger = logging.getLogger(__name__)

Download = Callable[[RepoFile, Path], object]  # stage a listed file at its path under a folder


def is_cache_file(path: str) -> bool:
    return path.startswith(f"{CACHE_FOLDER}/")


def fetch_compile_caches(
    store: ModelStore, listing: list[RepoFile], version: str, origin: str, box: BoxFacts,
    download: Download, cancel: threading.Event | None = None,
) -> list[str]:  # fmt: skip
    """Stage and store the repo's caches that may serve this box; the keys stored."""
    by_key: dict[str, dict[str, RepoFile]] = defaultdict(dict)
    for entry in listing:
        parts = entry.path.split("/", 2)
        if len(parts) == 3 and parts[0] == CACHE_FOLDER:
            by_key[parts[1]][parts[2]] = entry
    if not by_key:
        return []
    if not caches_allowed(store, origin):
        return []
    with store.staging() as staged:
        for keyid, entries in sorted(by_key.items()):
            try:
                _stage_cache(store, keyid, entries, staged, box, download)
            except (EdgeAgentError, OSError, HfHubHTTPError, httpx2.TransportError) as error:
                # a cancel too: the version is already stored, and stays
                logger.warning("compile cache %s from %s: not fetched (%s)", keyid, origin, error)
            if cancel is not None and cancel.is_set():
                return []
        return take_compile_caches(store, staged / CACHE_FOLDER, version, origin)


def _stage_cache(
    store: ModelStore, keyid: str, entries: dict[str, RepoFile], staged: Path, box: BoxFacts,
    download: Download,
) -> None:  # fmt: skip
    if not KEYID.match(keyid) or CACHE_MANIFEST not in entries:
        raise EdgeAgentError(f"not a compile cache folder (no {CACHE_MANIFEST})")
    download(entries[CACHE_MANIFEST], staged)
    manifest = read_manifest(staged / CACHE_FOLDER / keyid)
    if reasons := box_differences(box, manifest.key):
        logger.info("compile cache %s: not fetched: %s", keyid, "; ".join(reasons))
        return
    wanted = []
    for file in manifest.files:
        entry = entries.get(f"{FILES}/{file.path}")
        if entry is None or entry.size != file.size:
            raise EdgeAgentError(f"{file.path} is listed in {CACHE_MANIFEST} but not on the hub "
                                 f"as listed")  # fmt: skip
        wanted.append(entry)
    store.ensure_free(sum(e.size for e in wanted), f"the compile cache {keyid}")
    for entry in wanted:
        download(entry, staged)
