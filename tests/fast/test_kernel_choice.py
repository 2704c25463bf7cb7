"""Issue 26, until vLLM's in-place reload of Marlin-format weights is fixed: `auto` never
chooses a kernel whose reload is broken. Where updates reload in place on Hopper it takes
Machete, and GetServerInfo says which kernel runs."""

from __future__ import annotations

import grpc
import pytest

from edgeagent.engine.vllm_engine import choose_quantized_kernel
from edgeagent.v1 import generation_pb2 as pb
from edgeagent.v1 import generation_pb2_grpc as pb_grpc
from fast.runner import Box, in_process


@pytest.mark.parametrize(
    ("setting", "in_place", "hopper", "kernel"),
    [
        ("auto", True, True, "machete"),  # Marlin's reload hangs the engine there
        ("auto", False, True, "marlin"),  # updates start a new engine: the faster kernel
        ("auto", True, False, "marlin"),  # Machete is Hopper's only
        ("marlin", True, True, "marlin"),  # an operator's choice stands
        ("machete", False, True, "machete"),
    ],
)
def test_auto_avoids_marlin_where_updates_reload_in_place(
    setting: str, in_place: bool, hopper: bool, kernel: str
) -> None:
    chosen, why = choose_quantized_kernel(setting, in_place, hopper)
    assert chosen == kernel
    if (setting, in_place, hopper) == ("auto", True, True):
        assert "issue 26" in why


@pytest.mark.parametrize(
    ("swap", "budget_gib", "kernel"),
    [
        ("in_place", "", "machete"),
        ("auto", "", "marlin"),  # the fake GPU has room for a second engine: beside
        ("auto", "1.5", "machete"),  # a budget for one engine (~1.05 GiB) only: in place
    ],
    ids=["in_place", "beside", "no-room-beside"],
)
async def test_the_daemon_tells_the_engine_how_updates_will_load(
    box: Box, swap: str, budget_gib: str, kernel: str
) -> None:
    budget = {"EDGEAGENT_MEMORY__BUDGET_GIB": budget_gib} if budget_gib else {}
    async with in_process(box, EDGEAGENT_UPDATES__SWAP=swap, **budget) as daemon:
        assert daemon.engine.config.reloads_in_place is (kernel == "machete")
        async with grpc.aio.insecure_channel(box.target) as channel:
            info = await pb_grpc.GenerationServiceStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=10
            )
        status = await daemon.status()
    assert info.engine.quantized_kernel == kernel
    assert status.next_swap.startswith("in place" if kernel == "machete" else "beside")
