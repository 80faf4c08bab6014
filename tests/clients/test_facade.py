"""`from specmesh import Client, AsyncClient, launch`: one API whether a gateway or the services
are behind it; the same greedy tokens either way; the library's own errors, never gRPC's."""

from __future__ import annotations

import pytest

from specmesh import AsyncClient, Client, GenerationParams, launch
from specmesh.clients.gateway import start_gateway
from specmesh.errors import InvalidRequest
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import spec_stack

pytestmark = pytest.mark.models
PROMPT = "Once upon a time"


async def test_gateway_and_services_give_the_same_greedy_tokens(models):
    params = GenerationParams(max_new_tokens=20, ignore_eos=True)
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        server, servicer = await start_gateway(verify, draft, str(models / TINY_TARGET))
        try:
            async with AsyncClient(verify=verify, draft=draft,
                                   tokenizer=models / TINY_TARGET) as direct, \
                    AsyncClient(f"127.0.0.1:{server.port}") as gateway:
                a = await direct.generate(PROMPT, params)
                b = await gateway.generate(PROMPT, params)
                assert a.token_ids == b.token_ids and len(a.token_ids) == 20
                assert a.text == b.text and b.finish_reason == "length"
                assert "".join([t async for t in gateway.stream(PROMPT, params)]) == a.text
                # a keyword override applies; keywords not given never override params
                short = await gateway.generate(PROMPT, params, max_new_tokens=5)
                assert short.token_ids == a.token_ids[:5]
                for client in (direct, gateway):
                    with pytest.raises(InvalidRequest) as info:
                        await client.generate(PROMPT, params, top_p=2.0)
                    assert info.value.field.endswith("top_p")
                with pytest.raises(InvalidRequest) as info:  # the gateway's check, not gRPC's
                    await gateway.generate([1, 10 ** 6], params)
                assert "token_ids" in info.value.field
        finally:
            await server.stop(0)
            await servicer.close()


def test_launch_runs_a_local_stack_for_a_blocking_client(models):
    with launch(target=models / TINY_TARGET, draft=models / TINY_DRAFT) as client:
        assert isinstance(client, Client)
        result = client.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
        assert len(result.token_ids) == 12 and result.text
        assert "".join(client.stream(PROMPT, max_new_tokens=12, ignore_eos=True)) == result.text
