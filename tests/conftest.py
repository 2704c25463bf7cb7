"""Shared fixtures: the tiny models, one real vLLM engine and one gRPC server for the session.

The session's engine serves the random-weight tiny model quantized to 4-bit GPTQ by AutoRound
with the embedded recipe: its answers are noise, so they run to max_tokens, which most tests
count on. The embedded default as the product makes it (the tiny model trained on the
project's text, then AutoRound) is built too, for the tests where quality matters; its
training is cached in .cache/trained, so a machine trains it once. The engine is vLLM's real
`AsyncLLM` on the CPU; nothing here mocks it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from waits import HANG_S

from edgeagent.demo.tiny import EMBEDDED_MODEL_ID, build_tiny_model
from edgeagent.demo.train import trained_tiny_model
from edgeagent.engine.interface import Engine, EngineConfig
from edgeagent.engine.slot import Serving, ServingSlot
from edgeagent.engine.vllm_engine import VllmEngine
from edgeagent.fit import FitRequest, plan
from edgeagent.gpu import SystemMemoryProbe
from edgeagent.server.app import SERVICE_NAME, ApiServer
from edgeagent.server.health import SlotHealth
from edgeagent.server.service import GenerationService
from edgeagent.settings import LimitSettings, ServerSettings
from edgeagent.sources.build import EMBEDDED_RECIPE, BuildRequest, build, build_embedded
from edgeagent.store.manifest import Manifest
from edgeagent.store.store import ModelStore
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
# vLLM's compile cache survives between runs on one machine; a cold one costs ~30 s more.
CACHE = REPO / ".cache"  # the trained tiny model too (once per machine, ~2-3 min on 2 cores)
COMPILE_CACHE = CACHE / "vllm"
os.environ.setdefault("VLLM_CACHE_ROOT", str(COMPILE_CACHE))
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no traffic leaves loopback

TEST_CONTEXT = 1024
TEST_LIMITS = LimitSettings(
    max_input_bytes=16 * 1024,
    max_messages=8,
    max_stop_sequences=2,
    max_stop_sequence_bytes=16,
    default_max_tokens=32,
)
TEST_MAX_MESSAGE_BYTES = 128 * 1024


@pytest.fixture(scope="session")
def tiny_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-a", seed=0)


@pytest.fixture(scope="session")
def tiny_fp16_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-b", seed=1)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("state") / "models")


@pytest.fixture(scope="session")
def tiny_4bit(model_store: ModelStore, tiny_fp16: Path) -> Manifest:
    """The random-weight model with the embedded recipe (AutoRound, ~30 s): the session's."""
    request = BuildRequest(base=tiny_fp16, recipe=EMBEDDED_RECIPE, label=EMBEDDED_MODEL_ID)
    return build(model_store, request)


@pytest.fixture(scope="session")
def trained_fp16() -> Path:
    """The embedded model's trained fp16 base, from the cache or trained now."""
    return trained_tiny_model(CACHE)


@pytest.fixture(scope="session")
def embedded_4bit(model_store: ModelStore, trained_fp16: Path) -> Manifest:
    """The embedded default, built the way the daemon builds it (trained, then AutoRound)."""
    return build_embedded(model_store, CACHE)


@pytest.fixture(scope="session")
def tiny_4bit_b(model_store: ModelStore, tiny_fp16_b: Path) -> Manifest:
    """A second 4-bit version with the same layout (round-to-nearest, seconds): for reloads."""
    recipe = EMBEDDED_RECIPE.model_copy(update={"iters": 0})
    return build(model_store, BuildRequest(base=tiny_fp16_b, recipe=recipe, label="tiny-b"))


@pytest.fixture(scope="session")
def tiny_model(model_store: ModelStore, tiny_4bit: Manifest) -> Path:
    return model_store.model_dir(tiny_4bit.version)


@pytest.fixture(scope="session")
def tiny_model_b(model_store: ModelStore, tiny_4bit_b: Manifest) -> Path:
    return model_store.model_dir(tiny_4bit_b.version)


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Iterator[VllmEngine]:
    config = EngineConfig(
        model_path=tiny_model,
        kv_cache_bytes=128 << 20,
        max_num_seqs=8,
        max_model_len=TEST_CONTEXT,
        scheduling_policy="priority",  # requests' priority field is tested against it
        cpu_quantized_kernel="edgeagent",  # the AVX2 path, on every CPU (test_cpu_kernels.py)
    )
    engine = VllmEngine.start(config)
    yield engine
    engine.shutdown()


async def serving_slot(engine: Engine, manifest: Manifest) -> ServingSlot:
    """A slot serving `engine` as `manifest`, sized as the fit check sizes it for this host."""
    fit = plan(manifest.architecture, SystemMemoryProbe().read(), FitRequest(8, 2048))
    serving = Serving(engine, manifest, fit)

    async def install(_: Serving | None) -> Serving:
        return serving

    slot = ServingSlot()
    await slot.swap(install, hold_s=0)
    return slot


@pytest.fixture(scope="session")
async def slot(engine: VllmEngine, tiny_4bit: Manifest) -> ServingSlot:
    """What the session's gRPC server serves: the session's engine on the embedded model."""
    return await serving_slot(engine, tiny_4bit)


def api_server(
    slot: ServingSlot, socket_path: Path, settings: ServerSettings | None = None, **extra: Any
) -> ApiServer:
    """The gRPC servers as the daemon assembles them, over `slot`."""
    service = GenerationService(slot, TEST_LIMITS)
    health = SlotHealth(slot, [SERVICE_NAME])
    return ApiServer(service, health, settings or ServerSettings(), socket_path, **extra)


@pytest.fixture(scope="session")
async def api_target(
    slot: ServingSlot, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A real gRPC server on a Unix socket, serving the session's engine."""
    socket_path = tmp_path_factory.mktemp("run") / "edgeagent.sock"
    server = api_server(slot, socket_path, ServerSettings(max_message_bytes=TEST_MAX_MESSAGE_BYTES))
    await server.start()
    yield f"unix:{socket_path}"
    await server.stop(grace=None)


@pytest.fixture
async def stub(api_target: str) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    async with grpc.aio.insecure_channel(api_target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


async def wait_until_engine_idle(
    engine: Engine, slot: ServingSlot | None = None, within_s: float = HANG_S
) -> None:
    """Poll until the engine (and the slot's requests, if given) has no request left; fail
    only after the hang guard (an abort's progress, not a time, is what callers wait for)."""
    for _ in range(int(within_s / 0.05)):
        if engine.num_unfinished_requests() == 0 and not (slot and len(slot)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"engine still has {engine.num_unfinished_requests()} request(s), "
        f"server {len(slot) if slot else 'n/a'}"
    )
