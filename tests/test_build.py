"""AutoRound builds: the embedded default's manifest, cancel and kill, bad calibration, disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CACHE
from transformers import AutoTokenizer
from waits import HANG_S, wait_until

from edgeagent.demo import train
from edgeagent.demo.tiny import EMBEDDED_MODEL_ID, PHI4_CHAT_TEMPLATE
from edgeagent.sources import build
from edgeagent.sources.build import build_embedded
from edgeagent.store.manifest import BuildSource, Manifest
from edgeagent.store.store import ModelStore


def test_embedded_model_is_4bit_gptq_with_its_recipe_recorded(
    model_store: ModelStore, embedded_4bit: Manifest, trained_fp16: Path
) -> None:
    source = embedded_4bit.source
    assert isinstance(source, BuildSource)
    assert source.base == EMBEDDED_MODEL_ID
    assert source.tool.startswith("auto-round 0.16")
    recipe = source.recipe
    assert (recipe["bits"], recipe["group_size"], recipe["sym"], recipe["iters"]) == (
        4,
        128,
        True,
        50,
    )
    assert len(recipe["calibration"]["sha256"]) == 64
    assert recipe["calibration"]["source"] == "builtin: edgeagent training set"
    assert embedded_4bit.quantization_label == "gptq 4-bit g128 sym"
    fp16_bytes = (trained_fp16 / "model.safetensors").stat().st_size
    assert embedded_4bit.architecture.weight_bytes < 0.7 * fp16_bytes  # embeddings stay 16-bit

    tokenizer = AutoTokenizer.from_pretrained(model_store.model_dir(embedded_4bit.version))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user<|im_sep|>hi<|im_end|><|im_start|>assistant<|im_sep|>"
    assert tokenizer.chat_template == PHI4_CHAT_TEMPLATE


def test_the_same_base_and_recipe_build_once(
    model_store: ModelStore, embedded_4bit: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training is cached and the build found in the store: neither the trainer nor the
    AutoRound worker runs again, and the store gains nothing."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("ran again")

    monkeypatch.setattr(train, "_run_trainer", must_not_run)
    monkeypatch.setattr(build, "_worker", must_not_run)
    versions = [m.version for m in model_store.manifests()]
    assert build_embedded(model_store, CACHE) == embedded_4bit
    assert [m.version for m in model_store.manifests()] == versions


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_build_leaves_no_version_and_no_quantizer(
    sig: signal.Signals, tiny_fp16: Path, tmp_path: Path
) -> None:
    """1. A long build. 2. Its worker starts tuning (AutoRound logs its first block).
    3. The CLI gets SIGTERM (exit 130, staging removed) or SIGKILL (the worker dies with it; gc
    removes the staging)."""
    store = ModelStore(tmp_path / "state" / "models")
    with subprocess.Popen(
        [sys.executable, "-m", "edgeagent", "build", str(tiny_fp16), "--iters", "1000"],
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        worker = _wait_for_worker(process.pid)
        wait_until("the worker tuning its first block", lambda: _tuning(store, process))
        process.send_signal(sig)
        code = process.wait(timeout=HANG_S)
    assert code == (130 if sig == signal.SIGTERM else -9)
    _wait_gone(worker)

    assert store.manifests() == []
    if sig == signal.SIGKILL:
        store.gc(keep=1)
    assert [p.name for p in store.staging_root.iterdir()] == []


def test_too_little_calibration_text_is_a_clear_error(tiny_fp16: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    result = _run(["build", str(tiny_fp16), "--calibration", str(short)], tmp_path)
    assert result.returncode == 9
    assert "calibration text has" in result.stderr


def test_build_checks_the_disk_first(tiny_fp16: Path, tmp_path: Path) -> None:
    result = _run(["build", str(tiny_fp16)], tmp_path, EDGEAGENT_STORE__MIN_FREE_GIB="1000000")
    assert result.returncode == 6
    assert "the build needs" in result.stderr


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "EDGEAGENT_CONFIG": str(tmp_path / "absent.toml"),
        "EDGEAGENT_STATE_DIR": str(tmp_path / "state"),
        **extra,
    }


def _run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], env=_env(tmp_path, **env),
        capture_output=True, text=True, timeout=HANG_S, check=False,
    )  # fmt: skip


def _wait_for_worker(parent: int) -> int:
    def child() -> int | None:
        for task in Path(f"/proc/{parent}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        return None

    return wait_until("the build worker to start", child, every_s=0.1)


def _tuning(store: ModelStore, process: subprocess.Popen[str]) -> bool:
    """Whether AutoRound has started on a block (its log in the build's staging); fails
    at once if the build exited first."""
    assert process.poll() is None, process.communicate()
    return any(
        "Quantizing model.layers." in log.read_text(errors="replace")
        for log in store.staging_root.glob("*/worker.log")
    )


def _wait_gone(pid: int) -> None:
    """Until the worker has exited (SIGKILL by its parent death signal, or stopped by the
    CLI); if it keeps running the hang guard fails the test: it outlived its parent."""

    def exited() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        return state == "Z"  # exited; only its entry is left for a parent that is gone

    wait_until(f"the AutoRound worker {pid} to exit after its parent", exited, every_s=0.1)


def test_builtin_calibration_text_is_the_same_in_every_process() -> None:
    """A process's imports must not change the text, or the same recipe would build twice."""
    from edgeagent.sources.calibration import load_calibration

    fresh = subprocess.run(
        [sys.executable, "-I", "-c", "from edgeagent.sources.calibration import "
         "load_calibration as f; print(f(None).sha256)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert fresh.stdout.strip() == load_calibration(None).sha256
