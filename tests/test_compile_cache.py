"""A compile cache travels with its version: the real daemon on the CPU engine stores what it
compiled beside the version, the version is published with it and imported on a fresh host (a
new store, an empty cache directory), and that host's engine loads the compiled graph instead of
compiling it.

On vLLM's CPU build (0.32: compilation mode DYNAMO_TRACE_ONCE) the graph is compiled by Inductor
directly, so the engine's own word on it is Inductor's: "fx graph cache hit" or "miss" (logged
with TORCH_LOGS); vLLM's "Directly load the compiled graph" is its GPU path's.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from launcher import Launched, launch
from waits import HANG_S

from edgeagent.store.compile_cache import CACHE_FOLDER, CACHE_MANIFEST, read_manifest
from edgeagent.store.manifest import ImportSource
from edgeagent.store.store import ModelStore

SETTINGS = {
    "EDGEAGENT_MODEL__KV_CACHE_GIB": "0.25",
    "EDGEAGENT_UPDATES__QUALITY_GATE": "false",
    "EDGEAGENT_UPDATES__WATCH_DROP_DIR": "false",
    "TORCH_LOGS": "torch._inductor.codecache",  # Inductor says whether its graph cache hit
}
SERVING = re.compile(r"serving \S+ \((\w+)\) ([\d.]+) s after the process started")
COMPILE_STEP = re.compile(r"torch\.compile and warm-up run[^\n]*?([\d.]+) s")


def _host(tmp_path: Path, name: str, model: Path) -> tuple[ModelStore, str]:
    """A host with an empty cache directory whose store holds `model` (with its compile cache,
    if the directory brings one) as current."""
    store = ModelStore(tmp_path / name / "state" / "models")
    version = store.import_directory(model, ImportSource(origin=str(model))).version
    store.activate(version)
    return store, version


def _serve(tmp_path: Path, name: str) -> tuple[Launched, float]:
    """A daemon of host `name` started, waited for until it serves, and its start in seconds."""
    workdir = tmp_path / name
    daemon = launch(workdir, workdir / "state", workdir / "cache", SETTINGS)
    daemon.wait_until_serving(HANG_S)
    found = SERVING.search(daemon.log())
    assert found, daemon.tail()
    return daemon, float(found.group(2))


def _wait_for_cache(store: ModelStore, version: str, daemon: Launched) -> Path:
    folder = store.versions / version / CACHE_FOLDER
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        bundles = sorted(folder.glob(f"*/{CACHE_MANIFEST}"))
        if bundles:
            return bundles[0].parent
        time.sleep(0.5)
    raise AssertionError(f"no compile cache stored beside {version}:\n{daemon.tail()}")


def test_an_imported_compile_cache_starts_warm(tmp_path: Path, tiny_model: Path) -> None:
    """1. Host A (empty cache) starts a daemon on the tiny 4-bit model: Inductor compiles the
       graph (a cache miss), and once the engine serves, the daemon stores the cache beside the
       version (its key, each file's sha256).
    2. The version is published as a directory with its `compile-cache/` and imported on host
       B, a new store with an empty cache directory: the cache is checked and kept.
    3. Host B's daemon imports it before the engine starts; Inductor loads the graph (a hit,
       no miss) and nothing new is compiled.
    """
    store_a, version = _host(tmp_path, "a", tiny_model)
    daemon, cold_s = _serve(tmp_path, "a")
    try:
        bundle = _wait_for_cache(store_a, version, daemon)
    finally:
        assert daemon.terminate() == 0
    cold_log = daemon.log()
    assert "fx graph cache miss" in cold_log, cold_log[-4000:]
    assert f"compile cache for {version}: none stored" in cold_log
    manifest = read_manifest(bundle)
    assert manifest.files
    assert manifest.made_from == version
    assert json.loads((bundle / CACHE_MANIFEST).read_text())["keyid"] == bundle.name

    published = tmp_path / "published"
    shutil.copytree(store_a.model_dir(version), published, symlinks=False)
    shutil.copytree(bundle.parent, published / CACHE_FOLDER)
    store_b, version_b = _host(tmp_path, "b", published)
    assert version_b == version
    assert (store_b.versions / version / CACHE_FOLDER / bundle.name / CACHE_MANIFEST).is_file()
    assert not (tmp_path / "b" / "cache").exists()  # a fresh host: nothing compiled yet

    daemon, warm_s = _serve(tmp_path, "b")
    assert daemon.terminate() == 0
    warm_log = daemon.log()
    assert f"compile cache for {version}: imported (key {bundle.name}" in warm_log
    assert "fx graph cache hit" in warm_log, warm_log[-4000:]
    assert "fx graph cache miss" not in warm_log, warm_log[-4000:]
    assert f"compile cache for {version}: the engine compiled nothing new" in warm_log
    steps = {name: COMPILE_STEP.search(log) for name, log in (("cold", cold_log),
                                                               ("imported", warm_log))}  # fmt: skip
    print(
        f"\nCPU engine start, tiny 4-bit model: cold {cold_s:.1f} s, with the imported "
        f"cache {warm_s:.1f} s (torch.compile and warm-up: "
        + ", ".join(f"{k} {m.group(1) if m else '?'} s" for k, m in steps.items())
        + ")"
    )
