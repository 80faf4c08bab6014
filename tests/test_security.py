"""Safe on a shared network (real servers on port 0, a real redis-server): TLS and mTLS, bearer
tokens and roles on every RPC, per-caller ownership of sequences, and a cache no client can
poison."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_pki import LocalSecrets
from specmesh.clients.result_cache import ResultCache
from specmesh.clients.tokenizer import TextCodec
from specmesh.clients.types import GenerationParams
from specmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    draft_pb2,
    verify_pb2,
    verify_pb2_grpc,
)
from specmesh.wire.cache_client import CacheClient
from specmesh.wire.security import Security
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park. One day, she saw a big, red ball.")


@pytest.fixture
def pki(tmp_path) -> LocalSecrets:
    return LocalSecrets.create(tmp_path / "pki")


def tls_only(s: LocalSecrets, **changes) -> Security:
    return dataclasses.replace(s.service(), token_file=None, token=None, cache_key_file=None,
                               **changes)


async def model_info(channel) -> common_pb2.ModelInfo:
    stub = verify_pb2_grpc.VerifyServiceStub(channel)
    return await stub.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=5)


async def fails(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await model_info(channel)
    return info.value.code()


async def test_tls_needs_the_right_ca_and_mtls_a_client_certificate(models, pki, tmp_path):
    other = LocalSecrets.create(tmp_path / "other")
    async with model_server("verify", models / TINY_TARGET, security=tls_only(pki)) as (addr, _):
        async with Security(tls_ca=str(pki.ca)).channel(addr) as ch:
            assert (await model_info(ch)).name == TINY_TARGET
        async with grpc.aio.insecure_channel(addr) as ch:  # plaintext to a TLS port
            assert await fails(ch) == grpc.StatusCode.UNAVAILABLE
        async with Security(tls_ca=str(other.ca)).channel(addr) as ch:  # a CA that did not sign
            assert await fails(ch) == grpc.StatusCode.UNAVAILABLE
    mtls = tls_only(pki, tls_client_auth=True)
    async with model_server("verify", models / TINY_TARGET, security=mtls) as (addr, _):
        async with Security(tls_ca=str(pki.ca)).channel(addr) as ch:  # no client certificate
            assert await fails(ch) == grpc.StatusCode.UNAVAILABLE
        async with Security(tls_ca=str(pki.ca), tls_cert=str(pki.cert),
                            tls_key=str(pki.key)).channel(addr) as ch:
            assert (await model_info(ch)).vocab_size > 0


def raw_calls(channel, service: grpc.ServiceDescriptor):
    """One callable per method of `service`, sending an empty request (bytes in, bytes out)."""
    ident = {"request_serializer": None, "response_deserializer": None}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        if method.client_streaming and method.server_streaming:
            make = channel.stream_stream
        elif method.client_streaming:
            make = channel.stream_unary
        elif method.server_streaming:
            make = channel.unary_stream
        else:
            make = channel.unary_unary
        yield method, make(path, **ident)


async def call_raw(method, call) -> grpc.StatusCode:
    """Invoke with an empty message; the status it ends with (OK when it succeeds)."""
    try:
        arg = iter([b""]) if method.client_streaming else b""
        reply = call(arg, timeout=5)
        if method.server_streaming:
            async for _ in reply:
                pass
        else:
            await reply
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.redis
async def test_every_rpc_needs_a_known_token_and_only_services_write_the_cache(
        models, pki, redis_server):
    sec = pki.service()
    cache_server, cache_servicer = await start_server(CacheServiceConfig(
        redis_url=redis_server.url, security=sec))
    cache_addr = f"127.0.0.1:{cache_server.port}"
    try:
        async with model_server("verify", models / TINY_TARGET, security=sec) as (v, _), \
                model_server("draft", models / TINY_DRAFT, security=sec) as (d, _):
            services = {v: verify_pb2.DESCRIPTOR.services_by_name["VerifyService"],
                        d: draft_pb2.DESCRIPTOR.services_by_name["DraftService"],
                        cache_addr: cache_pb2.DESCRIPTOR.services_by_name["CacheService"]}
            for addr, service in services.items():
                for token in (None, "not-a-token"):
                    async with Security(tls_ca=str(pki.ca), token=token).channel(addr) as ch:
                        for method, call in raw_calls(ch, service):
                            code = await call_raw(method, call)
                            assert code == grpc.StatusCode.UNAUTHENTICATED, (addr, method.name)
                        health = health_pb2_grpc.HealthStub(ch)  # health needs no token
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                        assert reply.status == health_pb2.HealthCheckResponse.SERVING
            client = Security(tls_ca=str(pki.ca), token=pki.client_token)
            async with client.channel(cache_addr) as ch:
                stub = cache_pb2_grpc.CacheServiceStub(ch)
                put = cache_pb2.PutResultRequest(key=cache_pb2.ResultKey(
                    target_fingerprint="x", prompt_token_ids=[1, 2], max_new_tokens=4,
                    sampling=common_pb2.SamplingParams()),
                    token_ids=[1])
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.PutResult(put, timeout=5)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "client" in info.value.details()
                await stub.GetResult(cache_pb2.GetResultRequest(key=put.key), timeout=5)
            async with sec.channel(cache_addr) as ch:  # a service token may write
                stub = cache_pb2_grpc.CacheServiceStub(ch)
                assert (await stub.PutResult(put, timeout=5)).stored
            async with client.channel(v) as ch:  # a client token may verify
                assert (await model_info(ch)).name == TINY_TARGET
    finally:
        await cache_server.stop(0.1)
        await cache_servicer.close()


async def decode(stub, seq_id: str, prompt: list[int], steps: int, between=None) -> list[int]:
    """Target-only greedy decoding through raw Verify calls; `between(step)` runs after each."""
    out, cached, new = [], 0, list(prompt)
    for step in range(steps):
        reply = await stub.Verify(verify_pb2.VerifyRequest(header=common_pb2.SequenceHeader(
            sequence_id=seq_id, num_cached_tokens=cached, new_tokens=new)), timeout=10)
        out.append(reply.tokens[-1])
        cached, new = reply.num_cached_tokens, [reply.tokens[-1]]
        if between is not None:
            await between(step)
    return out


@pytest.mark.parametrize("auth", [False, True], ids=["per-connection", "tokens"])
async def test_another_caller_cannot_touch_a_sequence(models, pki, auth):
    """Release, finished ids and a Verify that recreates the victim's id with other tokens: the
    victim's output is what it is without the attacks (auth off: each connection is its own
    namespace; tokens on: each identity)."""
    sec = pki.service() if auth else Security()
    victim_sec = dataclasses.replace(sec, token=pki.client_token) if auth else sec
    thief_token = pki.operator_token if auth else None  # another identity, even a strong one
    thief_sec = dataclasses.replace(sec, token=thief_token) if auth else sec
    prompt = TextCodec(models / TINY_TARGET).encode("Once upon a time")
    async with model_server("verify", models / TINY_TARGET, security=sec) as (addr, _):
        async with victim_sec.channel(addr) as ch:
            clean = await decode(verify_pb2_grpc.VerifyServiceStub(ch), "victim", prompt, 12)
        async with victim_sec.channel(addr) as vch, thief_sec.channel(addr) as tch:
            victim, thief = (verify_pb2_grpc.VerifyServiceStub(c) for c in (vch, tch))

            async def attack(step: int) -> None:
                if step % 3 == 0:
                    await thief.Release(verify_pb2.VerifyReleaseRequest(
                        sequence_ids=["victim"]), timeout=5)
                elif step % 3 == 1:
                    await thief.Verify(verify_pb2.VerifyRequest(
                        header=common_pb2.SequenceHeader(sequence_id="victim",
                                                         num_cached_tokens=0,
                                                         new_tokens=[1, 99, 98, 97]),
                        finished_sequence_ids=["victim"]), timeout=5)
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:  # not its sequence
                        await thief.Verify(verify_pb2.VerifyRequest(
                            header=common_pb2.SequenceHeader(sequence_id="other",
                                                             num_cached_tokens=3,
                                                             new_tokens=[5])), timeout=5)
                    assert info.value.code() == grpc.StatusCode.NOT_FOUND

            attacked = await decode(victim, "victim", prompt, 12, attack)
    assert attacked == clean


@pytest.mark.redis
async def test_forged_results_and_chunks_are_misses(models, pki, redis_server):
    """Auth off, so anyone may write the cache: a result and prefix chunks written without the
    fleet's MAC key are misses, and the output is the target's own."""
    cache_server, cache_servicer = await start_server(CacheServiceConfig(
        redis_url=redis_server.url))
    cache_addr = f"127.0.0.1:{cache_server.port}"
    fleet = Security(cache_key_file=str(pki.cache_key))
    codec = TextCodec(models / TINY_TARGET)
    prompt = codec.encode(STORY)  # >= 2 chunks of 16 tokens
    params = GenerationParams(max_new_tokens=16, ignore_eos=True, speculate=False)
    try:
        async with model_server("verify", models / TINY_TARGET) as (v, _):
            async with AsyncSpecMeshClient(v) as plain:
                expected = (await plain.generate(prompt, params=params)).token_ids
        async with model_server("verify", models / TINY_TARGET, cache_addr=cache_addr,
                                security=fleet) as (v, servicer):
            cfg = servicer.engine.loaded.config
            fp = servicer.engine.loaded.fingerprint
            async with CacheClient(cache_addr) as thief:  # no key: what an outsider can do
                garbage = [np.random.default_rng(i).standard_normal(
                    (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32)
                    for i in range(2)]
                assert await thief.put_chunks(fp, prompt, 16, 0, garbage) == 2
                key = ResultCache.key(params, prompt, "", fp, "none")
                assert await thief.put_result(key, codec.encode(" HACKED by the cache")[1:],
                                              "length")
            async with AsyncSpecMeshClient(v, cache_addr=cache_addr, security=fleet) as client:
                first = await client.generate(prompt, params=params)
                assert first.token_ids == expected and not first.stats.cache_hit
                assert client.results.stats.rejected == 1
                again = await client.generate(prompt, params=params)  # the fleet's own entry
                assert again.token_ids == expected and again.stats.cache_hit
            assert servicer.prefix.client.stats.rejected >= 1
    finally:
        await cache_server.stop(0.1)
        await cache_servicer.close()


async def test_speculative_greedy_end_to_end_with_tls_and_tokens(models, pki):
    """The whole path with TLS + tokens on (services with the fleet's settings, the client with
    a client token): speculative greedy output equals target-only output."""
    sec = pki.service()
    async with model_server("verify", models / TINY_TARGET, security=sec) as (v, _), \
            model_server("draft", models / TINY_DRAFT, security=sec) as (d, _):
        async with AsyncSpecMeshClient(v, d, str(models / TINY_TARGET),
                                       security=pki.client()) as client:
            spec = await client.generate(STORY, 40, ignore_eos=True)
            plain = await client.generate(STORY, 40, ignore_eos=True, speculate=False)
            stubs = client._loop.stubs  # the round streams carried the token too
            assert stubs.verify_call.streaming and stubs.verify_call.num_opened == 1
            assert stubs.propose_call.streaming and stubs.propose_call.num_opened == 1
    assert spec.token_ids == plain.token_ids and spec.stats.num_accepted_tokens > 0


async def test_gateway_https_and_grpc_need_the_ca_and_a_token(models, pki):
    """The gateway with the fleet's settings: gRPC and its OpenAI-compatible HTTPS API take a
    client token (the OpenAI client's api_key); a wrong one is UNAUTHENTICATED / 401."""
    import ssl

    import openai

    from specmesh import AsyncClient
    from specmesh.clients.gateway import start_gateway
    from specmesh.errors import Unauthenticated

    sec = pki.service()
    async with model_server("verify", models / TINY_TARGET, security=sec) as (v, _), \
            model_server("draft", models / TINY_DRAFT, security=sec) as (d, _):
        server, servicer = await start_gateway(v, d, str(models / TINY_TARGET), http_port=0,
                                               security=sec)
        base = f"https://127.0.0.1:{servicer.http.port}/v1"
        try:
            async with AsyncClient(f"127.0.0.1:{server.port}", security=pki.client()) as c:
                want = await c.generate("Once upon a time", max_new_tokens=12)
            with pytest.raises(Unauthenticated):
                async with AsyncClient(f"127.0.0.1:{server.port}",
                                       security=Security(tls_ca=str(pki.ca), token="x")) as c:
                    await c.generate("Once upon a time", max_new_tokens=12)
            trust = ssl.create_default_context(cafile=str(pki.ca))
            for key, ok in ((pki.client_token, True), ("wrong", False)):
                async with openai.DefaultAsyncHttpxClient(verify=trust) as http:
                    api = openai.AsyncOpenAI(base_url=base, api_key=key, http_client=http,
                                             max_retries=0)
                    if ok:
                        out = await api.completions.create(
                            model=TINY_TARGET, prompt="Once upon a time", max_tokens=12,
                            temperature=0)
                        assert out.choices[0].text == want.text
                    else:
                        with pytest.raises(openai.AuthenticationError):
                            await api.completions.create(model=TINY_TARGET, prompt="x",
                                                         max_tokens=2)
            async with openai.DefaultAsyncHttpxClient(verify=trust) as http:  # health: no token
                assert (await http.get(base.replace("/v1", "/health"))).status_code == 200
        finally:
            await servicer.http.stop()
            await server.stop(0)
            await servicer.close()
