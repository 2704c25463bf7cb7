"""The engine's start, step by step, in the start timeline (`edgeagent.timeline`).

vLLM starts its engine core in a child process, and on CPU the model runs in a grandchild (its
worker). This module records, in each of them, when the steps of a start ended: the process
started and its imports done (loaded as a vLLM plugin, entry point `vllm.general_plugins`, which
vLLM loads once its own imports are done), and the steps vLLM logs as it finishes them (weights
loaded, torch.compile and warm-up, CUDA graphs, KV cache), timed when the line is logged. A
line vLLM no longer writes only merges its step into the next; nothing here is needed to serve.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from edgeagent.engine import worker_forkserver
from edgeagent.timeline import STEPS_VARIABLE, process_started_monotonic, record_step

# The start of a line vLLM logs (its format string) -> what the process did until then.
LOGGED_STEPS = (
    ("Initializing a V1 LLM engine", "handshake with the daemon"),
    ("Starting to load model", "distributed setup, model runner"),
    ("Loading weights took", "model built, weights read"),
    ("Model loading took", "weights processed (repacked for the kernel)"),
    ("Warming up model for the compilation", "weights processed (repacked for the kernel)"),
    ("Warming up done", "torch.compile and warm-up run (Dynamo, Inductor cache)"),
    ("Dynamo bytecode transform time", "Dynamo bytecode transform"),
    ("Directly load the compiled graph", "compiled graphs loaded from the cache"),
    ("Compiling a graph for", "a graph compiled by Inductor"),
    ("torch.compile t", "torch.compile, the rest"),
    ("Memory profiling takes", "memory profiling run"),
    ("Available KV cache memory", "KV cache sized"),
    ("Explicitly set (", "KV cache sized"),
    ("Auto set (", "KV cache sized"),
    ("Graph capturing finished", "CUDA graphs captured"),
    ("init engine (profile, create kv cache, warmup model)", "KV cache allocated, warm-up done"),
)


def role() -> str:
    """Which of vLLM's processes this is, by the name vLLM gave it."""
    name = multiprocessing.current_process().name
    if name.startswith("EngineCore"):
        return "engine core"
    if "Worker" in name:
        return "worker"
    return "daemon"


class StepsFromLog:
    """A log record factory that records a step when vLLM logs the line that ends it, at the
    time of the call (the line's own timestamp has a resolution of a second). A factory, not a
    handler: vLLM configures its loggers again in each process, which removes other handlers."""

    def __init__(self, make_record: Callable[..., logging.LogRecord]) -> None:
        self.make_record = make_record

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.make_record(*args, **kwargs)
        if record.name.startswith("vllm") and os.environ.get(STEPS_VARIABLE):
            template = str(record.msg).removeprefix("%s")  # some start with a prefix argument
            for start, step in LOGGED_STEPS:
                if template.startswith(start):
                    record_step(f"{role()}: {step}")
                    break
        return record


def install_log_hook() -> None:
    """Once per process (a forked process inherits its parent's)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, StepsFromLog):
        logging.setLogRecordFactory(StepsFromLog(factory))


def register() -> None:
    """vLLM's plugin hook, run in each of its processes once vLLM is imported. In a process
    started for the engine (spawned: a fresh interpreter), its start and its imports are two
    steps; the daemon records its own."""
    install_log_hook()
    who = role()
    if who == "worker" and worker_forkserver.forked_from_server:
        record_step("starting the worker process (forked: its imports ran beside the daemon's)",
                    at=process_started_monotonic())  # fmt: skip
        record_step("worker: set up", at=time.monotonic())
    elif who != "daemon":
        record_step(f"starting the {who} process", at=process_started_monotonic())
        record_step(f"{who}: interpreter, imports (vLLM, torch)", at=time.monotonic())
