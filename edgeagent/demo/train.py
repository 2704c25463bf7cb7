"""Training the embedded tiny model, deterministically, on the project's own text.

The tiny Phi-4-family model (tiny.py) starts from random weights and learns, in a couple of
minutes on two CPU cores, the generated chat exchanges and shipped prose of dataset.py. Fixed
seeds, a fixed data order, a fixed thread count and torch's deterministic algorithms make a
rerun on the same machine write the same bytes. The result is cached under the cache directory,
keyed by a digest of the recipe, the shape, the data and a format number (bumped when this code
changes what it writes), so the demo and the tests train once.

Training runs in a child process (`python -m edgeagent.demo.train RECIPE OUT PPID`, which
dies with its parent like the AutoRound worker): it sets torch's global switches (threads,
deterministic algorithms) that the daemon's own process must not inherit, and a signal stops it
cleanly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeagent.children import die_with_parent
from edgeagent.demo import dataset
from edgeagent.demo.tiny import TinyShape, write_config, write_tokenizer
from edgeagent.errors import BuildError, StoppedError
from edgeagent.progress import Progress
from edgeagent.store.durable import fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

TRAINED_FORMAT = 3  # bump when this module changes what it writes
SHAPE = TinyShape()

# The kernels the training child may use, the same on every x86-64 CPU with AVX2 whatever wider
# instructions it also has: without these, torch, oneDNN and MKL each dispatch on the CPU's
# features, and an AVX-512 machine trains other bytes (another model) than an AVX2 one.
X86_TRAINING_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL's widest code path
    "MKL_CBWR": "AVX2,STRICT",  # MKL's bit-reproducible mode on that path
    "MKL_DYNAMIC": "FALSE",  # MKL must not drop threads when the machine is busy
}


@dataclass(frozen=True)
class TrainRecipe:
    """How the embedded model is trained; every field goes into the cache key."""

    steps: int = 400
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2


def training_kernels() -> dict[str, str]:
    """The environment that pins the training child's kernels on this machine's architecture
    (x86-64: AVX2 everywhere; elsewhere the libraries' own choice, recorded as such)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return dict(X86_TRAINING_KERNELS)
    return {}


def cache_key(recipe: TrainRecipe, shape: TinyShape = SHAPE) -> str:
    """The trained model's identity: recipe, shape, data, the kernels that compute it and the
    format, as a short digest."""
    record = {
        "recipe": asdict(recipe),
        "shape": asdict(shape),
        "data": dataset.digest(),
        "kernels": {"machine": platform.machine().lower(), **training_kernels()},
        "format": TRAINED_FORMAT,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def trained_tiny_model(
    cache_dir: Path, recipe: TrainRecipe = TrainRecipe(), cancel: threading.Event | None = None
) -> Path:
    """The trained fp16 model directory under `cache_dir`, trained first if not cached."""
    out_dir = Path(cache_dir) / "trained" / f"tiny-phi4-{cache_key(recipe)}"
    if (out_dir / "model.safetensors").is_file():
        logger.info("the trained tiny model is cached: %s", out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _run_trainer(recipe, staging, cancel)
        fsync_tree(staging)
        try:
            os.replace(staging, out_dir)
        except OSError:  # another process (a second test session) cached it meanwhile
            if not (out_dir / "model.safetensors").is_file():
                raise
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def trainer_environment(recipe: TrainRecipe) -> dict[str, str]:
    threads = str(recipe.threads)
    pinned = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        # OpenMP's threads sleep instead of spinning while they wait: beside another busy
        # process (a test's engine, a build) spinning threads took 5 s a step instead of 0.8.
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONUNBUFFERED": "1",
    }
    return {**os.environ, **training_kernels(), **pinned}


def _run_trainer(recipe: TrainRecipe, out: Path, cancel: threading.Event | None) -> None:
    env = trainer_environment(recipe)
    command = [sys.executable, "-m", "edgeagent.demo.train", json.dumps(asdict(recipe)),
               str(out), str(os.getpid())]  # fmt: skip
    logger.info("training the embedded tiny model: %s", asdict(recipe))
    progress = Progress("train tiny-phi4", recipe.steps, unit="steps")
    with subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True) as trainer:
        assert trainer.stdout is not None
        try:
            for line in trainer.stdout:
                if cancel is not None and cancel.is_set():
                    trainer.terminate()
                    raise StoppedError("training was cancelled")
                _show(line, progress)
        except KeyboardInterrupt:
            trainer.terminate()
            raise StoppedError("training was interrupted") from None
    if trainer.returncode != 0:
        raise BuildError(f"training the tiny model failed with exit code {trainer.returncode}")
    progress.finish()


def _show(line: str, progress: Progress) -> None:
    try:
        event = json.loads(line)
    except ValueError:
        return
    if isinstance(event, dict) and event.get("event") == "step":
        progress.note = f"loss {event['loss']:.3f}"
        progress.update(int(event["step"]))


def train(recipe: TrainRecipe, out: Path, shape: TinyShape = SHAPE) -> None:
    """Write the tokenizer and config, train, and save fp16 weights into `out` (exists)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    ids = write_tokenizer(out, shape.vocab_size, texts=_tokenizer_texts())
    write_config(out, shape, ids)
    model = Phi3ForCausalLM(Phi3Config.from_pretrained(out)).float()  # type: ignore[no-untyped-call]
    tokens = _token_stream(Tokenizer.from_file(str(out / "tokenizer.json")))
    windows = _windows(tokens, recipe.seq_len)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    order = torch.Generator().manual_seed(recipe.seed)
    batches = _batches(windows, recipe, order)
    model.train()
    started = time.perf_counter()
    for step in range(1, recipe.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _emit({"event": "step", "step": step, "loss": float(loss.detach()),
               "elapsed_s": time.perf_counter() - started})  # fmt: skip
    weights = {name: t.detach().to(torch.float16).contiguous()
               for name, t in model.state_dict().items()}  # fmt: skip
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer_texts() -> list[str]:
    """The BPE learns from the same words the model does (special tokens left out)."""
    texts = dataset.shipped_prose()
    for exchange in dataset.exchanges():
        if not exchange.held_out:
            texts += [exchange.user, exchange.assistant]
    return texts


def _token_stream(tokenizer: Any) -> list[int]:
    stream: list[int] = []
    for document in dataset.training_documents():
        stream += tokenizer.encode(document, add_special_tokens=False).ids
    return stream


def _windows(tokens: list[int], seq_len: int) -> Any:
    """The token stream cut into windows of seq_len, half-overlapping: more starts per epoch."""
    import torch

    stream = torch.tensor(tokens, dtype=torch.long)
    starts = range(0, len(tokens) - seq_len, seq_len // 2)
    return torch.stack([stream[s : s + seq_len] for s in starts])


def _batches(windows: Any, recipe: TrainRecipe, order: Any) -> Any:
    """Endless batches: each epoch a permutation of the windows drawn from `order`."""
    import torch

    while True:
        permutation = torch.randperm(len(windows), generator=order)
        for first in range(0, len(permutation) - recipe.batch_size + 1, recipe.batch_size):
            yield windows[permutation[first : first + recipe.batch_size]]


def _learning_rate(recipe: TrainRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step <= recipe.warmup_steps:
        return recipe.learning_rate * step / recipe.warmup_steps
    done = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    die_with_parent(int(sys.argv[3]))  # a killed daemon must not leave training running
    train(TrainRecipe(**json.loads(sys.argv[1])), Path(sys.argv[2]))
