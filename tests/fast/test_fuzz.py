"""The gRPC surface fuzzed with hypothesis: every field of every RPC, against a real daemon
(fake engine). Every answer is one a client can act on, never UNKNOWN or INTERNAL, and the
daemon keeps serving. The same strategies run a small sample on the real engine
(tests/test_service.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from fuzz_requests import ALLOWED, binary_metadata, huge, requests, texts
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings

from edgeagent.client import Parameters, build_request
from edgeagent.v1 import admin_pb2 as admin_pb
from edgeagent.v1 import admin_pb2_grpc as admin_grpc
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.fakes import Behaviour
from fast.runner import Box, in_process

FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    """A daemon serving a fake engine, run on its own event loop in a thread so that the
    (synchronous) hypothesis tests can call it with blocking clients."""
    box = Box(tmp_path_factory.mktemp("fuzz"))
    box.add("a", Behaviour(seed=1), current=True)
    box.add("b", Behaviour(seed=2))
    loop, ready, stop = asyncio.new_event_loop(), threading.Event(), threading.Event()

    async def run() -> None:
        async with in_process(box, EDGEAGENT_CONFIG=str(box.root / "absent.toml")):
            ready.set()
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),))
    thread.start()
    assert ready.wait(30)
    yield box
    stop.set()
    thread.join()
    loop.close()


def _status_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _status(call: object) -> grpc.StatusCode:
    try:
        for _ in call if hasattr(call, "__iter__") else ():  # type: ignore[attr-defined]
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]


def _still_serving(box: Box) -> None:
    with grpc.insecure_channel(box.target) as channel:
        reply = pb_grpc.GenerationServiceStub(channel).Generate(  # type: ignore[no-untyped-call]
            build_request("still there?", params=Parameters(max_tokens=2)), timeout=10
        )
    assert reply.completion_tokens == 2


@FUZZ
@given(request=requests(), metadata=binary_metadata)
@example(request=huge("stops"), metadata=[])
@example(request=huge("prompt"), metadata=[])
@example(request=huge("messages"), metadata=[])
@example(request=huge("roles"), metadata=[])
@example(request=huge("empty"), metadata=[("x-fuzz-bin", b"\xff\xfe\x00invalid utf-8")])
def test_generation_answers_with_a_code_a_client_can_act_on(
    fuzzed: Box, request: pb.GenerateRequest, metadata: list[tuple[str, bytes]]
) -> None:
    with grpc.insecure_channel(fuzzed.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)  # type: ignore[no-untyped-call]
        codes = set()
        try:
            stub.Generate(request, timeout=10, metadata=metadata)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.add(error.code())
        codes.add(_status(stub.GenerateStream(request, timeout=10, metadata=metadata)))
    assert codes <= ALLOWED, codes


@FUZZ
@given(service=texts)
@example(service="")
@example(service="edgeagent.v1.GenerationService")
def test_health_answers_serving_or_not_found(fuzzed: Box, service: str) -> None:
    with grpc.insecure_channel(fuzzed.target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
            code, status = grpc.StatusCode.OK, reply.status
        except grpc.RpcError as error:
            code, status = error.code(), None
    # NOT_FOUND for a service it does not know: the health protocol's own answer.
    assert (code, status) in {
        (grpc.StatusCode.OK, health_pb2.HealthCheckResponse.SERVING),
        (grpc.StatusCode.NOT_FOUND, None),
    }


@FUZZ
@given(version=texts)
@example(version="")
@example(version="../../refs")
def test_admin_update_answers_with_a_definite_code(fuzzed: Box, version: str) -> None:
    """Unknown or ambiguous versions: NOT_FOUND; refused ones: an outcome or
    FAILED_PRECONDITION. Never UNKNOWN or INTERNAL."""
    with grpc.insecure_channel(fuzzed.admin_target) as channel:
        stub = admin_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        code = _status_of(lambda: stub.Update(admin_pb.UpdateRequest(version=version), timeout=30))
    assert code in {*ALLOWED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


def test_the_daemon_still_serves_after_the_fuzzing(fuzzed: Box) -> None:
    _still_serving(fuzzed)
    with grpc.insecure_channel(fuzzed.target) as channel:
        info = pb_grpc.GenerationServiceStub(channel).GetModelInfo(  # type: ignore[no-untyped-call]
            pb.GetModelInfoRequest(), timeout=10
        )
    assert info.version in (fuzzed.versions["a"].version, fuzzed.versions["b"].version)
