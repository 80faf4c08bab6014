"""One bad item never touches the others of its batch (VerifyBatch / ProposeBatch over gRPC)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from specmesh.wire.codec import encode_sparse
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models
PROMPT = (1, 403, 407, 261, 931 % 512)
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def good(seq: str, tree=(), sampling=None, dists=()) -> verify_pb2.VerifyRequest:
    req = verify_pb2.VerifyRequest(header=common_pb2.SequenceHeader(
        sequence_id=seq, num_cached_tokens=0, new_tokens=PROMPT),
        sampling=sampling or common_pb2.SamplingParams())
    if tree:
        req.tree.tokens.extend(tree)
        req.tree.parents.extend(range(-1, len(tree) - 1))
    req.draft_dists.extend(dists)
    return req


def dist(ids, probs) -> common_pb2.SparseDistribution:
    return encode_sparse(np.asarray(ids, dtype=np.int32), np.asarray(probs, dtype=np.float16))


HOT = common_pb2.SamplingParams(temperature=1.0, seed=7)
BAD_ITEMS = {
    "draft token out of vocab": good("bad", (5,), HOT, [dist([9999], [1.0]), dist([5], [1.0])]),
    "NaN draft probabilities": good("bad", (5,), HOT, [dist([5], [float("nan")]),
                                                       dist([5], [1.0])]),
    "all-zero draft probabilities": good("bad", (5,), HOT, [dist([5], [0.0]), dist([5], [1.0])]),
    "tree over 128 nodes": good("bad", tuple([5] * 129)),
    "draft dists without a tree": good("bad", (), HOT, [dist([5], [1.0])]),
}


@pytest.fixture
async def verify_addr(models):
    async with model_server("verify", models / TINY_TARGET) as (addr, _):
        yield addr


async def reference(stub) -> list[tuple[int, ...]]:
    """What the good items get when they run without the bad one."""
    reply = await stub.VerifyBatch(verify_pb2.VerifyBatchRequest(
        requests=[good("ref-a", (5, 6)), good("ref-b")]))
    return [tuple(r.response.tokens) for r in reply.results]


@pytest.mark.parametrize("name", sorted(BAD_ITEMS))
async def test_bad_item_fails_alone(verify_addr, name):
    async with grpc.aio.insecure_channel(verify_addr) as ch:
        stub = verify_pb2_grpc.VerifyServiceStub(ch)
        want = await reference(stub)
        reply = await stub.VerifyBatch(verify_pb2.VerifyBatchRequest(requests=[
            good(f"a-{name}", (5, 6)), BAD_ITEMS[name], good(f"b-{name}")]))
        a, bad, b = reply.results
        assert bad.WhichOneof("outcome") == "error" and bad.error.code == INVALID, bad
        assert [tuple(a.response.tokens), tuple(b.response.tokens)] == want
        # nothing was kept for the failed item: a follow-up from scratch works
        again = await stub.VerifyBatch(verify_pb2.VerifyBatchRequest(requests=[good("bad")]))
        assert again.results[0].WhichOneof("outcome") == "response"


async def test_duplicate_sequence_in_one_batch_fails_the_second(verify_addr):
    async with grpc.aio.insecure_channel(verify_addr) as ch:
        stub = verify_pb2_grpc.VerifyServiceStub(ch)
        reply = await stub.VerifyBatch(verify_pb2.VerifyBatchRequest(
            requests=[good("dup"), good("dup"), good("other")]))
        first, second, other = reply.results
        assert first.WhichOneof("outcome") == "response"
        assert other.WhichOneof("outcome") == "response"
        assert second.error.code == INVALID and "requests[1].header.sequence_id" in \
            second.error.message


async def test_tiny_temperature_decodes_greedily(verify_addr):
    async with grpc.aio.insecure_channel(verify_addr) as ch:
        stub = verify_pb2_grpc.VerifyServiceStub(ch)
        cold = common_pb2.SamplingParams(temperature=1e-40)
        reply = await stub.VerifyBatch(verify_pb2.VerifyBatchRequest(
            requests=[good("cold", sampling=cold), good("greedy")]))
        assert [r.WhichOneof("outcome") for r in reply.results] == ["response", "response"]
        assert reply.results[0].response.tokens == reply.results[1].response.tokens


async def test_undecodable_bytes_are_invalid_argument(verify_addr):
    async with grpc.aio.insecure_channel(verify_addr) as ch:
        call = ch.unary_unary("/specmesh.v1.VerifyService/Verify",
                              request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff\xff\x0f")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("request:")
        # still serving
        stub = verify_pb2_grpc.VerifyServiceStub(ch)
        assert (await stub.Verify(good("after"))).tokens


async def test_propose_batch_isolates_items(models):
    async with model_server("draft", models / TINY_DRAFT) as (addr, _):
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = draft_pb2_grpc.DraftServiceStub(ch)

            def req(seq, tokens=PROMPT):
                return draft_pb2.ProposeRequest(header=common_pb2.SequenceHeader(
                    sequence_id=seq, new_tokens=tokens),
                    tree_spec=TreeSpec.parse("chain:3").to_proto())
            reply = await stub.ProposeBatch(draft_pb2.ProposeBatchRequest(requests=[
                req("p1"), req("p2", (1, 99999)), req("p1"), req("p3")]))
            kinds = [r.WhichOneof("outcome") for r in reply.results]
            assert kinds == ["response", "error", "error", "response"]
            assert "header.new_tokens[1]" in reply.results[1].error.message
            assert len(reply.results[0].response.tree.tokens) == 3
            assert reply.results[0].response.tree.tokens == reply.results[3].response.tree.tokens
