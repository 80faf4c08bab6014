"""Seeded fuzzing of every RPC of the draft, verify and cache services (real servers, real Redis).

Requests are generated from the protobuf descriptors (random field values biased to edges:
empty, negative, huge, NaN, out-of-vocab, long repeated fields, known and unknown sequence ids)
plus raw random bytes, sent concurrently so bad items share batches with good ones. Nothing may
answer UNKNOWN or INTERNAL (a batch item included), no server may die, and afterwards a good
request gives exactly the tokens it gave before the fuzzing. CI runs 2,000 requests; the `slow`
marker runs 20,000.
"""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from specmesh.cache_service.__main__ import start_server as start_cache
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    draft_pb2,
    draft_pb2_grpc,
    verify_pb2,
    verify_pb2_grpc,
)
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models
BAD = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SEQ_IDS = ["s0", "s1", "s2", "", "x" * 300]
INTS = [0, 1, 2, 3, -1, 5, 16, 128, 129, 511, 512, 513, 2**31 - 1, -2**31]
FLOATS = [0.0, 1.0, 0.5, -1.0, 1e-40, 1e-6, 2.0, 1e30, math.inf, -math.inf, math.nan]


def random_message(cls, rng: random.Random, depth: int = 0):
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        repeated = field.is_repeated
        count = rng.choice([0, 1, 2, 5, 17, 200]) if repeated else 1
        values = [_value(field, rng, depth) for _ in range(count)]
        values = [v for v in values if v is not None]
        if not values:
            continue
        if field.type == FD.TYPE_MESSAGE:
            target = getattr(msg, field.name)
            if repeated:
                for v in values:
                    target.add().CopyFrom(v)
            else:
                target.CopyFrom(values[0])
        elif repeated:
            getattr(msg, field.name).extend(values)
        else:
            setattr(msg, field.name, values[0])
    return msg


def _value(field, rng: random.Random, depth: int):
    t = field.type
    if t == FD.TYPE_MESSAGE:
        return None if depth > 3 else random_message(field.message_type._concrete_class, rng,
                                                     depth + 1)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return rng.choice(INTS + [rng.randint(-600, 600)])
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return rng.choice(INTS + [2**63 - 1, rng.randint(-600, 600)])
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32, FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return rng.choice([0, 1, 5, 512, 2**32 - 1])
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return rng.choice(FLOATS + [rng.uniform(-2, 2)])
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FD.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if t == FD.TYPE_STRING:
        if "sequence_id" in field.name or field.name.endswith("_ids"):
            return rng.choice(SEQ_IDS)
        return rng.choice(["", "a", "chain:4", "x" * rng.randint(1, 64)])
    if t == FD.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 7, 64, 2048]))
    raise AssertionError(f"unhandled field type {t}")


def _header(rng: random.Random) -> common_pb2.SequenceHeader:
    seq = rng.choice(SEQ_IDS[:3])
    return common_pb2.SequenceHeader(sequence_id=seq, num_cached_tokens=rng.choice([0, 0, 3]),
                                     new_tokens=[1] + [rng.randint(3, 511) for _ in range(4)])


def _verify_req(rng: random.Random) -> verify_pb2.VerifyRequest:
    n = rng.choice([0, 1, 4, 8])
    return verify_pb2.VerifyRequest(header=_header(rng), tree=common_pb2.TokenTree(
        tokens=[rng.randint(3, 511) for _ in range(n)], parents=list(range(-1, n - 1))))


def _propose_req(rng: random.Random) -> draft_pb2.ProposeRequest:
    return draft_pb2.ProposeRequest(header=_header(rng), tree_spec=common_pb2.TreeSpec(
        kind=common_pb2.TreeSpec.KIND_CHAIN, chain_length=rng.choice([1, 3, 4])))


# Valid requests to start from: one mutated field keeps most of a request plausible, so the
# fuzzing reaches the engines (and shares their batches) rather than stopping at validation.
TEMPLATES = {
    "VerifyService.Verify": _verify_req,
    "VerifyService.VerifyBatch": lambda rng: verify_pb2.VerifyBatchRequest(
        requests=[_verify_req(rng) for _ in range(rng.randint(1, 4))]),
    "DraftService.Propose": _propose_req,
    "DraftService.ProposeBatch": lambda rng: draft_pb2.ProposeBatchRequest(
        requests=[_propose_req(rng) for _ in range(rng.randint(1, 4))]),
}
TEMPLATES["VerifyService.VerifyStream"] = TEMPLATES["VerifyService.VerifyBatch"]
TEMPLATES["DraftService.ProposeStream"] = TEMPLATES["DraftService.ProposeBatch"]


def mutated(name: str, req_cls, rng: random.Random):
    """A template request with one field replaced by a random value (or a random message)."""
    template = TEMPLATES.get(name)
    if template is None or rng.random() < 0.3:
        return random_message(req_cls, rng)
    msg = template(rng)
    fields = req_cls.DESCRIPTOR.fields
    field = rng.choice(fields)
    noise = random_message(req_cls, rng)
    msg.ClearField(field.name)
    if field.is_repeated:
        getattr(msg, field.name).extend(getattr(noise, field.name))
    elif field.type == FD.TYPE_MESSAGE:
        if noise.HasField(field.name):
            getattr(msg, field.name).CopyFrom(getattr(noise, field.name))
    else:
        setattr(msg, field.name, getattr(noise, field.name))
    return msg


def methods(channel: grpc.aio.Channel, module, service: str):
    """(name, kind, request class, callable) for every method of `service`."""
    desc = module.DESCRIPTOR.services_by_name[service]
    out = []
    for m in desc.methods:
        path = f"/{desc.full_name}/{m.name}"
        req = m.input_type._concrete_class
        resp = m.output_type._concrete_class
        if m.client_streaming and m.server_streaming:
            call = channel.stream_stream(path, request_serializer=lambda b: b,
                                         response_deserializer=resp.FromString)
            kind = "bidi"
        elif m.client_streaming:
            call = channel.stream_unary(path, request_serializer=lambda b: b,
                                        response_deserializer=resp.FromString)
            kind = "stream_in"
        elif m.server_streaming:
            call = channel.unary_stream(path, request_serializer=lambda b: b,
                                        response_deserializer=resp.FromString)
            kind = "stream_out"
        else:
            call = channel.unary_unary(path, request_serializer=lambda b: b,
                                       response_deserializer=resp.FromString)
            kind = "unary"
        out.append((f"{service}.{m.name}", kind, req, call))
    return out


async def _send(kind: str, call, payloads: list[bytes]):
    async def gen():
        for p in payloads:
            yield p
    if kind == "stream_in":
        return [await call(gen(), timeout=30)]
    if kind == "bidi":
        return [m async for m in call(gen(), timeout=30)]
    if kind == "stream_out":
        return [m async for m in call(payloads[0], timeout=30)]
    return [await call(payloads[0], timeout=30)]


def _item_errors(responses) -> list[int]:
    """Codes of per-item errors inside batched replies."""
    codes = []
    for r in responses:
        for res in getattr(r, "results", []):
            if hasattr(res, "WhichOneof") and res.WhichOneof("outcome") == "error":
                codes.append(res.error.code)
    return codes


async def fuzz(all_methods, num_requests: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    bad_codes = {c.value[0] for c in BAD}
    failures: list[str] = []

    async def one(i: int) -> None:
        name, kind, req_cls, call = rng.choice(all_methods)
        if rng.random() < 0.1:
            payloads = [rng.randbytes(rng.randint(1, 64))]
        else:
            n = rng.choice([1, 1, 2, 3]) if kind in ("stream_in", "bidi") else 1
            payloads = [mutated(name, req_cls, rng).SerializeToString() for _ in range(n)]
        try:
            responses = await _send(kind, call, payloads)
            code = "OK"
            bad_items = [c for c in _item_errors(responses) if c in bad_codes]
            if bad_items:
                failures.append(f"request {i} {name}: batch item codes {bad_items}")
        except grpc.aio.AioRpcError as err:
            code = err.code().name
            if err.code() in BAD:
                failures.append(f"request {i} {name}: {code} {err.details()}")
        seen[f"{name} {code}"] = seen.get(f"{name} {code}", 0) + 1

    for start in range(0, num_requests, 16):  # 16 in flight: bad items share batches
        await asyncio.gather(*(one(i) for i in range(start, min(start + 16, num_requests))))
    assert not failures, "\n".join(failures[:20])
    return seen


async def good_tokens(verify_stub, seq: str) -> list[int]:
    reply = await verify_stub.Verify(verify_pb2.VerifyRequest(
        header=common_pb2.SequenceHeader(sequence_id=seq, new_tokens=[1, 403, 407, 261]),
        tree=common_pb2.TokenTree(tokens=[5, 6], parents=[-1, 0])), timeout=30)
    return list(reply.tokens)


async def run_fuzz(models, redis_server, num_requests: int, seed: int) -> None:
    cache_server, cache_servicer = await start_cache(
        CacheServiceConfig(redis_url=redis_server.url, redis_timeout_s=0.5))
    try:
        async with model_server("verify", models / TINY_TARGET) as (v_addr, _), \
                model_server("draft", models / TINY_DRAFT) as (d_addr, _):
            channels = [grpc.aio.insecure_channel(a) for a in
                        (v_addr, d_addr, f"127.0.0.1:{cache_server.port}")]
            verify_stub = verify_pb2_grpc.VerifyServiceStub(channels[0])
            before = await good_tokens(verify_stub, "reference-before")
            all_methods = (methods(channels[0], verify_pb2, "VerifyService")
                           + methods(channels[1], draft_pb2, "DraftService")
                           + methods(channels[2], cache_pb2, "CacheService"))
            seen = await fuzz(all_methods, num_requests, seed)
            assert len({k.split()[0] for k in seen}) >= len(all_methods) - 2, seen
            assert await good_tokens(verify_stub, "reference-after") == before
            draft_stub = draft_pb2_grpc.DraftServiceStub(channels[1])
            tree = await draft_stub.Propose(draft_pb2.ProposeRequest(
                header=common_pb2.SequenceHeader(sequence_id="d-after", new_tokens=[1, 403]),
                tree_spec=common_pb2.TreeSpec(kind=common_pb2.TreeSpec.KIND_CHAIN,
                                              chain_length=3)), timeout=30)
            assert len(tree.tree.tokens) == 3
            stats = await cache_pb2_grpc.CacheServiceStub(channels[2]).Stats(
                cache_pb2.StatsRequest(), timeout=10)
            assert stats is not None
            for ch in channels:
                await ch.close()
    finally:
        await cache_server.stop(0.1)
        await cache_servicer.close()


async def test_fuzz_every_rpc(models, redis_server):
    await run_fuzz(models, redis_server, num_requests=2000, seed=1234)


@pytest.mark.slow
async def test_fuzz_every_rpc_long(models, redis_server):
    await run_fuzz(models, redis_server, num_requests=20_000, seed=99)
