"""Bad requests get INVALID_ARGUMENT / NOT_FOUND naming the field; the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def header(seq="s1", cached=0, new=(1, 403, 407)):
    return common_pb2.SequenceHeader(sequence_id=seq, num_cached_tokens=cached, new_tokens=new)


VERIFY_CASES = [
    ("empty prompt", dict(header=header(new=())), INVALID, "header.new_tokens"),
    ("token out of vocab", dict(header=header(new=(1, 512))), INVALID, "header.new_tokens[1]"),
    ("negative token", dict(header=header(new=(-3,))), INVALID, "header.new_tokens[0]"),
    ("unknown sequence", dict(header=header(seq="nope", cached=3)), NOT_FOUND, "sequence_id"),
    ("negative cached", dict(header=header(cached=-1)), INVALID, "header.num_cached_tokens"),
    ("cached beyond sequence", dict(header=header(seq="known", cached=99)), INVALID,
     "header.num_cached_tokens"),
    ("empty sequence id", dict(header=header(seq="")), INVALID, "header.sequence_id"),
    ("not a tree", dict(header=header(), tree=common_pb2.TokenTree(tokens=[5, 6],
                                                                     parents=[1, -1])),
     INVALID, "tree.parents"),
    ("parents length", dict(header=header(), tree=common_pb2.TokenTree(tokens=[5, 6],
                                                                         parents=[-1])),
     INVALID, "tree.parents"),
    ("tree token out of vocab", dict(header=header(), tree=common_pb2.TokenTree(
        tokens=[9999], parents=[-1])), INVALID, "tree.tokens[0]"),
    ("temperature < 0", dict(header=header(), sampling=common_pb2.SamplingParams(
        temperature=-1)), INVALID, "sampling.temperature"),
    ("top_p 0", dict(header=header(), sampling=common_pb2.SamplingParams(
        temperature=1, top_p=0.0)), INVALID, "sampling.top_p"),
    ("top_p > 1", dict(header=header(), sampling=common_pb2.SamplingParams(
        temperature=1, top_p=1.5)), INVALID, "sampling.top_p"),
    ("top_k < 0", dict(header=header(), sampling=common_pb2.SamplingParams(top_k=-2)),
     INVALID, "sampling.top_k"),
    ("sampling without draft dists", dict(header=header(), tree=common_pb2.TokenTree(
        tokens=[5], parents=[-1]), sampling=common_pb2.SamplingParams(temperature=1.0)),
     INVALID, "draft_dists"),
    ("over-long prompt", dict(header=header(new=[5] * 600)), INVALID, "header.new_tokens"),
]


async def test_verify_bad_requests_name_the_field(models):
    async with model_server("verify", models / TINY_TARGET) as (addr, _):
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = verify_pb2_grpc.VerifyServiceStub(ch)
            await stub.Verify(verify_pb2.VerifyRequest(header=header(seq="known")))
            for name, fields, code, field in VERIFY_CASES:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Verify(verify_pb2.VerifyRequest(**fields))
                assert info.value.code() == code, name
                assert field in info.value.details(), (name, info.value.details())
            ok = await stub.Verify(verify_pb2.VerifyRequest(header=header(seq="after")))
            assert len(ok.tokens) == 1 and ok.num_cached_tokens == 3


DRAFT_CASES = [
    ("k = 0", common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_CHAIN, chain_length=0),
     "tree_spec.chain_length"),
    ("absurd k", common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_CHAIN, chain_length=10**6),
     "tree_spec.chain_length"),
    ("negative k", common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_CHAIN, chain_length=-4),
     "tree_spec.chain_length"),
    ("static zero", common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_STATIC, branching=[2, 0]),
     "tree_spec.branching"),
    ("static too big", common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_STATIC,
                                           branching=[8, 8, 8]), "tree_spec"),
    ("dynamic budget", common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_DYNAMIC,
                                           node_budget=100000), "tree_spec.node_budget"),
    ("unknown kind", common_pb2.TreeSpec(kind=17), "tree_spec.kind"),
]


async def test_draft_bad_requests_name_the_field(models):
    async with model_server("draft", models / TINY_DRAFT) as (addr, _):
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = draft_pb2_grpc.DraftServiceStub(ch)
            for name, spec, field in DRAFT_CASES:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Propose(draft_pb2.ProposeRequest(header=header(), tree_spec=spec))
                assert info.value.code() == INVALID, name
                assert field in info.value.details(), (name, info.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Propose(draft_pb2.ProposeRequest(header=header(seq="x", cached=2)))
            assert info.value.code() == NOT_FOUND
            ok = await stub.Propose(draft_pb2.ProposeRequest(header=header(), tree_spec=(
                common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_CHAIN, chain_length=3))))
            assert len(ok.tree.tokens) == 3 and list(ok.tree.parents) == [-1, 0, 1]
