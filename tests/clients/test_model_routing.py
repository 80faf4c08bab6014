"""Several models behind one gateway, over real servers on free ports: each request gets its
model's target-only output, name@version pins, weights split traffic exactly (smooth weighted
round-robin), unknown models are NOT_FOUND / 404, result-cache entries stay apart across
versions, and the registry reloads (in process and on SIGHUP)."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import urllib.request

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.facade import AsyncClient
from specmesh.clients.gateway import start_gateway
from specmesh.errors import UnknownModel
from specmesh.v1 import generate_pb2, generate_pb2_grpc
from tests.conftest import REPO, TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = [pytest.mark.models, pytest.mark.redis]
PROMPT = "Tom and Lily went to the park"  # the two tiny models differ from token 0


def registry_toml(entries: list[dict]) -> str:
    out = []
    for e in entries:
        out.append("[[models]]")
        out += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}"
                for k, v in e.items()]
    return "\n".join(out) + "\n"


async def generate(stub, model: str, max_new_tokens: int = 16):
    msgs = [m async for m in stub.Generate(generate_pb2.GenerateRequest(
        text=PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True, model=model))]
    return [t for m in msgs for t in m.token_ids], msgs[-1]


async def target_only(verify: str, tokenizer) -> list[int]:
    async with AsyncSpecMeshClient(verify, None, str(tokenizer)) as c:
        return (await c.generate(PROMPT, 16, speculate=False, ignore_eos=True)).token_ids


async def test_two_models_and_two_versions_behind_one_gateway(models, redis_server, tmp_path):
    cache_server, cache = await start_server(CacheServiceConfig(redis_url=redis_server.url))
    tok = str(models / TINY_TARGET)
    async with model_server("verify", models / TINY_TARGET) as (va, _), \
            model_server("verify", models / TINY_DRAFT) as (vb, _), \
            model_server("draft", models / TINY_DRAFT) as (d, _):
        want_a, want_b = await target_only(va, tok), await target_only(vb, tok)
        assert want_a != want_b  # two different models: a mix-up would show
        c = f"127.0.0.1:{cache_server.port}"
        common = dict(draft=d, cache=c, tokenizer=tok)
        path = tmp_path / "models.toml"
        path.write_text(registry_toml([
            dict(name="tiny", version="1", verify=va, tree="chain:4", weight=90, **common),
            dict(name="tiny", version="2", verify=vb, tree="dynamic:8", weight=10, **common),
            dict(name="small", version="1", verify=vb, tokenizer=tok, default=True)]))
        server, servicer = await start_gateway(None, None, None, models=path, http_port=0,
                                               metrics_port=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = generate_pb2_grpc.GenerateServiceStub(ch)
                listed = await stub.ListModels(generate_pb2.ListModelsRequest())
                assert [m.key for m in listed.models] == ["tiny@1", "tiny@2", "small@1"]
                assert listed.default_model == "small@1"
                assert [m.weight for m in listed.models] == [90, 10, 0]
                for again in (False, True):  # again: tiny's from the result cache, still apart
                    for model, want in [("tiny@1", want_a), ("tiny@2", want_b),
                                        ("small@1", want_b), ("", want_b)]:
                        ids, last = await generate(stub, model)
                        assert ids == want, model
                        assert last.model == (model or "small@1")
                        assert last.stats.cache_hit == (again and model.startswith("tiny"))
                served = collections.Counter()
                for chunk in range(10):
                    got = await asyncio.gather(*(generate(stub, "tiny", 1) for _ in range(20)))
                    served.update(last.model for _, last in got)
                assert served == {"tiny@1": 180, "tiny@2": 20}
                for model in ("nope", "tiny@3", "tiny@"):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await generate(stub, model)
                    assert info.value.code() == grpc.StatusCode.NOT_FOUND
                    assert info.value.details().startswith("model: unknown model")
            async with AsyncClient(f"127.0.0.1:{server.port}", model="tiny@2") as lib:
                r = await lib.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
                assert r.token_ids == want_b and r.model == "tiny@2"
            async with AsyncClient(f"127.0.0.1:{server.port}", model="nope") as lib:
                with pytest.raises(UnknownModel) as info:
                    await lib.generate(PROMPT, max_new_tokens=2)
                assert info.value.model == "nope" and info.value.code == "NOT_FOUND"
            api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{servicer.http.port}/v1",
                                     api_key="unused", max_retries=0)
            listed = await api.models.list()
            assert [m.id for m in listed.data] == ["tiny", "small", "tiny@1", "tiny@2",
                                                   "small@1"]
            codec = servicer.router.client_of(servicer.router.entries[0]).codec
            got = await api.completions.create(model="tiny@2", prompt=PROMPT, max_tokens=16,
                                               temperature=0, extra_body={"ignore_eos": True})
            assert got.choices[0].text == codec.decode(want_b) and got.model == "tiny@2"
            with pytest.raises(openai.NotFoundError):
                await api.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
            await api.close()
            scraped = await asyncio.to_thread(urllib.request.urlopen,
                                              f"http://127.0.0.1:{servicer.metrics_port}/metrics")
            ttft = {(s.labels["model"], s.labels["priority"]): s.value
                    for f in text_string_to_metric_families(scraped.read().decode())
                    if f.name == "specmesh_time_to_first_token_seconds"
                    for s in f.samples if s.name.endswith("_count")}
            assert ttft[("tiny@1", "interactive")] >= 180 and ttft[("tiny@2", "interactive")] >= 20
            # a new file: tiny@2 retired, tiny@3 added on the first verify service
            path.write_text(registry_toml([
                dict(name="tiny", version="1", verify=va, default=True, **common),
                dict(name="tiny", version="3", verify=va, tree="chain:2", max_new_tokens=8,
                     **common)]))
            await servicer.router.reload()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = generate_pb2_grpc.GenerateServiceStub(ch)
                assert (await generate(stub, "tiny@3", 8))[0] == want_a[:8]
                assert (await generate(stub, "tiny"))[1].model == "tiny@1"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await generate(stub, "tiny@2")
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as info:  # the version's own cap
                    await generate(stub, "tiny@3", 9)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details().startswith("max_new_tokens")
        finally:
            await servicer.http.stop()
            await server.stop(0)
            await servicer.close()
            await cache_server.stop(0)
            await cache.close()


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float = 60.0) -> re.Match:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} never printed:\n{''.join(lines)}")


async def test_sighup_reloads_the_models_file(models, tmp_path):
    tok = str(models / TINY_TARGET)
    async with model_server("verify", models / TINY_TARGET) as (va, _):
        path = tmp_path / "models.yaml"
        path.write_text(f"models:\n  - {{name: a, version: '1', verify: '{va}', "
                        f"tokenizer: '{tok}'}}\n")
        env = {**os.environ, "PYTHONSAFEPATH": "1", "SPECMESH_PROGRESS": "0"}
        proc = subprocess.Popen([sys.executable, "-m", "specmesh.clients.gateway", "--models",
                                 str(path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            port = await asyncio.to_thread(_read_until, proc, r"SERVING [\d.]+:(\d+)")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port.group(1)}") as ch:
                stub = generate_pb2_grpc.GenerateServiceStub(ch)
                listed = await stub.ListModels(generate_pb2.ListModelsRequest())
                assert [m.key for m in listed.models] == ["a@1"]
                path.write_text("models: [oops")  # a bad file: logged, the old table serves
                proc.send_signal(signal.SIGHUP)
                await asyncio.to_thread(_read_until, proc, r"models not reloaded")
                path.write_text(f"models:\n  - {{name: b, version: '2', verify: '{va}', "
                                f"tokenizer: '{tok}'}}\n")
                proc.send_signal(signal.SIGHUP)
                await asyncio.to_thread(_read_until, proc, r"models reloaded: b@2")
                listed = await stub.ListModels(generate_pb2.ListModelsRequest())
                assert [m.key for m in listed.models] == ["b@2"]
                ids, last = await generate(stub, "b", 4)
                assert len(ids) == 4 and last.model == "b@2"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
