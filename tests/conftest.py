"""Shared fixtures: the tiny models, one real vLLM engine and one gRPC server for the session.

The served model is the embedded default as the product makes it: the tiny fp16 model quantized
to 4-bit GPTQ by AutoRound and committed to a store. The engine is vLLM's real `AsyncLLM` on
the CPU; nothing here mocks it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from edgeagent.artifacts.build import EMBEDDED_RECIPE, BuildRequest, build, build_embedded
from edgeagent.artifacts.manifest import Manifest
from edgeagent.artifacts.store import ModelStore
from edgeagent.artifacts.tiny import build_tiny_model
from edgeagent.engine import EngineConfig, VllmEngine
from edgeagent.server.app import ApiServer
from edgeagent.server.inflight import InflightRequests
from edgeagent.server.service import GenerationService, ServedModel
from edgeagent.settings import LimitSettings, ServerSettings
from edgeagent.v1 import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
# vLLM's compile cache survives between runs on one machine; a cold one costs ~30 s more.
COMPILE_CACHE = REPO / ".cache" / "vllm"
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
def tiny_4bit(model_store: ModelStore) -> Manifest:
    """The embedded default, built the way the daemon builds it (AutoRound, ~30 s)."""
    return build_embedded(model_store)


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
    )
    engine = VllmEngine.start(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def inflight() -> InflightRequests:
    return InflightRequests()


@pytest.fixture(scope="session")
async def api_target(
    engine: VllmEngine, inflight: InflightRequests, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """A real gRPC server on a Unix socket, serving the session's engine."""
    socket_path = tmp_path_factory.mktemp("run") / "edgeagent.sock"
    service = GenerationService(engine, ServedModel("tiny", "test-1"), TEST_LIMITS, inflight)
    server = ApiServer(
        service, ServerSettings(max_message_bytes=TEST_MAX_MESSAGE_BYTES), socket_path
    )
    await server.start()
    await server.set_serving(True)
    yield f"unix:{socket_path}"
    await server.stop(grace=None)


@pytest.fixture
async def stub(api_target: str) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    async with grpc.aio.insecure_channel(api_target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


async def wait_until_engine_idle(
    engine: VllmEngine, inflight: InflightRequests | None = None, within_s: float = 5.0
) -> None:
    """Poll until the engine (and the server, if given) has no request left."""
    for _ in range(int(within_s / 0.05)):
        if engine.num_unfinished_requests() == 0 and not (inflight and len(inflight)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"engine still has {engine.num_unfinished_requests()} request(s), "
        f"server {len(inflight) if inflight else 'n/a'}"
    )
