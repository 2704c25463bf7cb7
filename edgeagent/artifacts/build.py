"""Build a 4-bit GPTQ model with Intel AutoRound and commit it to the store.

The quantizer runs in a child process (`build_worker.py`): AutoRound may call `sys.exit`, holds
the whole base model in memory, and stops cleanly only by a signal. This side checks the disk,
hands the worker a job file, turns its events into progress, stops it when cancelled, and
commits the export with a manifest that records the base model's digest and the recipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgeagent.artifacts.calibration import Calibration, load_calibration
from edgeagent.artifacts.manifest import BuildSource, Manifest, read_config, sha256_of
from edgeagent.artifacts.store import ModelStore
from edgeagent.artifacts.tiny import EMBEDDED_MODEL_ID, build_tiny_model
from edgeagent.errors import BuildError, ConfigError, StoppedError
from edgeagent.progress import Progress
from edgeagent.settings import BuildSettings

logger = logging.getLogger(__name__)

BASE_MODEL_FILES = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
POLL_S = 0.2


# Small enough to tune in seconds on one CPU core, large enough to exercise AutoRound's tuning.
EMBEDDED_RECIPE = BuildSettings(iters=50, nsamples=32, seqlen=128, device="cpu")


class BuildRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    base: Path
    recipe: BuildSettings = BuildSettings()
    label: str | None = Field(default=None, description="how the manifest names the base")


def build(
    store: ModelStore, request: BuildRequest, cancel: threading.Event | None = None
) -> Manifest:
    """Quantize `request.base` and commit the result; the same base and recipe build once."""
    base_files = _base_files(request.base)
    calibration = load_calibration(request.recipe.calibration)
    recipe_record = {
        **request.recipe.model_dump(exclude={"calibration"}),
        "calibration": calibration.describe(),
    }
    base_digest = _digest_of(request.base, base_files)
    built = _find_build(store, base_digest, recipe_record)
    if built is not None:
        logger.info("this base and recipe were built before: version %s", built.version)
        return built
    weight_bytes = sum(f.stat().st_size for f in base_files if f.suffix == ".safetensors")
    store.ensure_free(_estimated_output_bytes(weight_bytes, request.recipe), "the build")
    with store.staging() as staged:
        output = _run_worker(staged, request, calibration, cancel)
        source = BuildSource(
            base=request.label or str(request.base),
            base_digest=base_digest,
            recipe=recipe_record,
            tool=f"auto-round {package_version('auto-round')}",
        )
        return store.commit(output, source)


def build_embedded(store: ModelStore, cancel: threading.Event | None = None) -> Manifest:
    """The embedded default: the tiny fp16 model, quantized like any other base."""
    with store.staging() as staged:
        base = build_tiny_model(staged / "tiny-phi4-fp16")
        request = BuildRequest(base=base, recipe=EMBEDDED_RECIPE, label=EMBEDDED_MODEL_ID)
        return build(store, request, cancel)


def _base_files(base: Path) -> list[Path]:
    read_config(base)  # a clear error when base is not a model directory
    files = sorted({p for pattern in BASE_MODEL_FILES for p in base.glob(pattern)})
    if not any(f.suffix == ".safetensors" for f in files):
        raise ConfigError(f"{base}: no safetensors weights to quantize")
    return files


def _digest_of(base: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(base)}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def _find_build(store: ModelStore, base_digest: str, recipe: dict[str, Any]) -> Manifest | None:
    for manifest in reversed(store.manifests()):
        source = manifest.source
        if source.kind == "build" and source.base_digest == base_digest and source.recipe == recipe:
            return manifest
    return None


def _estimated_output_bytes(weight_bytes: int, recipe: BuildSettings) -> int:
    """The export, the worker's scratch space and headroom; 16-bit weights shrink by bits/16.

    Embeddings and lm_head stay 16-bit, so the estimate uses bits/16 + 25 %.
    """
    return int(weight_bytes * (recipe.bits / 16 + 0.25)) + (64 << 20)


def _run_worker(
    staged: Path, request: BuildRequest, calibration: Calibration, cancel: threading.Event | None
) -> Path:
    (out_dir := staged / "out").mkdir()
    (work_dir := staged / "work").mkdir()
    job = {
        "base": str(request.base.resolve()),
        "out_dir": str(out_dir),
        "work_dir": str(work_dir),
        "recipe": request.recipe.model_dump(exclude={"calibration"}),
        "calibration_text": calibration.text,
    }
    (job_path := staged / "job.json").write_text(json.dumps(job))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(request.recipe.threads),
        "HF_HUB_OFFLINE": "1",  # the base is local; nothing may reach for the hub
        "PYTHONUNBUFFERED": "1",
    }
    stderr_path = staged / "worker.log"
    logger.info("building from %s: %s", request.base, request.recipe.model_dump(mode="json"))
    with stderr_path.open("w") as stderr, _worker(job_path, env, stderr) as worker:
        reported_error = _follow(worker, request, cancel)
    if worker.returncode != 0:
        tail = "\n".join(deque(stderr_path.read_text(errors="replace").splitlines(), maxlen=15))
        raise BuildError(
            f"AutoRound exited with code {worker.returncode}: {reported_error or tail}"
        )
    return _export_dir(out_dir)


@contextlib.contextmanager
def _worker(job_path: Path, env: dict[str, str], stderr: Any) -> Iterator[subprocess.Popen[str]]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "edgeagent.artifacts.build_worker", str(job_path), str(os.getpid())],
        stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
    )  # fmt: skip
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.terminate()  # AutoRound stops cleanly on SIGTERM
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()


def _follow(
    worker: subprocess.Popen[str], request: BuildRequest, cancel: threading.Event | None
) -> str | None:
    """Turn the worker's events into progress until it exits; stop it when cancelled.

    Returns the last error the worker reported, if any.
    """
    reported_error = None
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    threading.Thread(target=_read_events, args=(worker, events), daemon=True).start()
    layers = int(read_config(request.base)["num_hidden_layers"])
    progress = Progress(f"build {request.label or request.base.name}", layers, unit="blocks")
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise StoppedError("the build was cancelled; the store is unchanged")
            try:
                event = events.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if event is None:
                break
            if event["event"] == "error":
                reported_error = str(event["message"])
            _handle(event, progress)
    except KeyboardInterrupt:
        raise StoppedError("the build was interrupted; the store is unchanged") from None
    worker.wait()
    if worker.returncode == 0:
        progress.finish()
    return reported_error


def _read_events(worker: subprocess.Popen[str], events: queue.Queue[dict[str, Any] | None]) -> None:
    assert worker.stdout is not None
    for line in worker.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict) and "event" in event:
            events.put(event)
        elif line.strip():
            logger.debug("autoround: %s", line.rstrip())
    events.put(None)


def _handle(event: dict[str, Any], progress: Progress) -> None:
    kind = event["event"]
    if kind == "block":
        progress.update(int(event["done"]))
    elif kind in ("warning", "error"):
        logger.log(logging.WARNING if kind == "warning" else logging.ERROR, "%s", event["message"])


def _export_dir(out_dir: Path) -> Path:
    """AutoRound writes into a subdirectory named after the model and scheme."""
    candidates = [p.parent for p in out_dir.rglob("config.json")]
    if len(candidates) != 1:
        raise BuildError(f"expected one exported model under {out_dir}, found {len(candidates)}")
    return candidates[0]
