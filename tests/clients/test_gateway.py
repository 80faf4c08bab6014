"""GenerateService over real gRPC: any stub can generate; bad input names the field."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest

from specmesh.clients.gateway import start_gateway
from specmesh.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from tests.conftest import REPO, TINY_DRAFT, TINY_TARGET
from tests.stack import spec_stack

pytestmark = pytest.mark.models


async def collect(stub, req):
    return [m async for m in stub.Generate(req)]


async def test_gateway_streams_the_target_output(models):
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        server, servicer = await start_gateway(verify, draft, str(models / TINY_TARGET))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = generate_pb2_grpc.GenerateServiceStub(ch)
                spec = await collect(stub, generate_pb2.GenerateRequest(
                    text="Once upon a time", max_new_tokens=24, ignore_eos=True))
                plain = await collect(stub, generate_pb2.GenerateRequest(
                    text="Once upon a time", max_new_tokens=24, speculate=False,
                    ignore_eos=True))
                ids = [t for m in spec for t in m.token_ids]
                assert ids == [t for m in plain for t in m.token_ids] and len(ids) == 24
                assert "".join(m.text for m in spec).startswith(", there was a little girl")
                last = spec[-1]
                assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
                assert last.stats.num_accepted_tokens > 0 and last.stats.num_generated_tokens == 24
                assert all(m.finish_reason == 0 for m in spec[:-1])
                stop = await collect(stub, generate_pb2.GenerateRequest(
                    text="Once upon a time", max_new_tokens=60, stop=["Lily"]))
                assert stop[-1].finish_reason == generate_pb2.FINISH_REASON_STOP
                assert stop[-1].matched_stop == "Lily"
                stop_texts = set()
                for tree in (None, common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_CHAIN,
                                                       chain_length=4),
                             common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_DYNAMIC,
                                                 node_budget=8)):
                    req = generate_pb2.GenerateRequest(text="Once upon a time",
                                                       max_new_tokens=60, stop=["Lily"],
                                                       speculate=tree is not None)
                    if tree is not None:
                        req.tree_spec.CopyFrom(tree)
                    stop_texts.add("".join(m.text for m in await collect(stub, req)))
                assert len(stop_texts) == 1 and not stop_texts.pop().endswith("Lily")
                window = await collect(stub, generate_pb2.GenerateRequest(
                    text="Once upon a time", max_new_tokens=4096, ignore_eos=True))
                assert window[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
                assert window[-1].stats.num_generated_tokens < 512  # ended by the context
                for req, field in [
                    (generate_pb2.GenerateRequest(), "prompt"),
                    (generate_pb2.GenerateRequest(text=""), "prompt"),
                    (generate_pb2.GenerateRequest(token_ids=generate_pb2.PromptTokens(
                        ids=[1, 99999])), "token_ids.ids[1]"),
                    (generate_pb2.GenerateRequest(text="x", max_new_tokens=-1),
                     "max_new_tokens"),
                    (generate_pb2.GenerateRequest(text="x", max_new_tokens=0),
                     "max_new_tokens"),  # 0 is rejected, as the CLI and client do
                    (generate_pb2.GenerateRequest(text="x", priority=7), "priority"),
                    (generate_pb2.GenerateRequest(text="x", max_new_tokens=4097),
                     "max_new_tokens"),
                    (generate_pb2.GenerateRequest(text="x", sampling=common_pb2.SamplingParams(
                        temperature=1, top_p=2)), "sampling.top_p"),
                    (generate_pb2.GenerateRequest(text="x", tree_spec=common_pb2.TreeSpec(
                        kind=common_pb2.TreeSpec.KIND_CHAIN, chain_length=0)),
                     "tree_spec.chain_length"),
                ]:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await collect(stub, req)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert field in info.value.details(), info.value.details()
                again = await collect(stub, generate_pb2.GenerateRequest(
                    token_ids=generate_pb2.PromptTokens(ids=[1, 403]), max_new_tokens=4))
                assert sum(len(m.token_ids) for m in again) == 4
        finally:
            await server.stop(0.5)
            await servicer.close()


async def test_locust_headless_against_the_gateway_has_no_failures(models, tmp_path):
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        server, servicer = await start_gateway(verify, draft, str(models / TINY_TARGET))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "locust", "-f", str(REPO / "loadtest" / "locustfile.py"),
                "--headless", "-u", "4", "-r", "4", "-t", "6s", "--only-summary",
                "--host", f"127.0.0.1:{server.port}", "--csv", str(tmp_path / "run"),
                env=dict(os.environ, SPECMESH_MAX_NEW_TOKENS="16"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            await server.stop(0.5)
            await servicer.close()
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    stats = (tmp_path / "run_stats.csv").read_text().splitlines()
    rows = {line.split(",")[1]: line.split(",") for line in stats[1:]}
    assert {"generate", "time_to_first_token", "per_token", "accepted_per_round"} <= rows.keys()
    assert int(rows["generate"][2]) > 0  # requests
    assert int(rows["Aggregated"][3]) == 0  # failures
