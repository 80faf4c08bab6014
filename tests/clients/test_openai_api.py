"""The gateway's OpenAI-compatible HTTP API, driven by the official `openai` client against real
servers on free ports: greedy text equals the client library's, streamed and not; bad fields
are 400s that name them; chat needs (and uses) the tokenizer's chat template."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.chat_template import ChatTemplate
from specmesh.clients.gateway import start_gateway
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import spec_stack

pytestmark = pytest.mark.models
PROMPT = "Once upon a time"
MODEL = TINY_TARGET  # a one-model gateway serves its tokenizer folder's name
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


async def _gateway(verify, draft, tokenizer_dir):
    server, servicer = await start_gateway(verify, draft, str(tokenizer_dir), http_port=0)
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{servicer.http.port}/v1",
                             api_key="unused", max_retries=0)
    return server, servicer, api


async def _stop(server, servicer, api):
    await api.close()
    await servicer.http.stop()
    await server.stop(0)
    await servicer.close()


async def test_completions_equal_the_client_library_streamed_and_not(models):
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as lib:
            want = await lib.generate(PROMPT, 24, temperature=0.0, ignore_eos=True)
        gw = await _gateway(verify, draft, models / TINY_TARGET)
        api = gw[2]
        try:
            got = await api.completions.create(model="stories260K", prompt=PROMPT,
                                               max_tokens=24, temperature=0,
                                               extra_body={"ignore_eos": True})
            assert got.choices[0].text == want.text
            assert got.choices[0].finish_reason == "length"
            assert got.usage.completion_tokens == 24
            assert got.usage.prompt_tokens == len(want.prompt_token_ids)
            stream = await api.completions.create(
                model="stories260K", prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "tree": "dynamic:8"})
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert text == want.text
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
            assert chunks[-1].usage.completion_tokens == 24
            plain = await api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                                 temperature=0,
                                                 extra_body={"speculate": False,
                                                             "ignore_eos": True})
            assert plain.choices[0].text == want.text
            for extra in (dict(extra_body={"priority": "batch", "ignore_eos": True}),
                          dict(extra_body={"ignore_eos": True},
                               extra_headers={"X-Priority": "batch"})):
                batch = await api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24,
                                                     temperature=0, **extra)
                assert batch.choices[0].text == want.text
            with pytest.raises(openai.BadRequestError) as info:
                await api.completions.create(model=MODEL, prompt=PROMPT,
                                             extra_headers={"X-Priority": "urgent"})
            assert info.value.body["param"] == "priority"
            models_list = await api.models.list()
            assert [m.id for m in models_list.data] == [TINY_TARGET, f"{TINY_TARGET}@1"]
            assert got.model == f"{TINY_TARGET}@1"
        finally:
            await _stop(*gw)


async def test_bad_fields_are_400s_that_name_them(models):
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        gw = await _gateway(verify, draft, models / TINY_TARGET)
        api = gw[2]
        try:
            for kwargs, field in [(dict(logprobs=2), "logprobs"),
                                  (dict(temperature=-1), "temperature"),
                                  (dict(n=2), "n"),
                                  (dict(max_tokens=0), "max_tokens"),
                                  (dict(extra_body={"tree": "chain:99"}), "tree"),
                                  (dict(extra_body={"priority": "urgent"}), "priority")]:
                with pytest.raises(openai.BadRequestError) as info:
                    await api.completions.create(model=MODEL, prompt=PROMPT, **kwargs)
                assert field in info.value.message, (field, info.value.message)
            with pytest.raises(openai.BadRequestError) as info:  # no template: a clear 400
                await api.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert "chat template" in info.value.message
            with pytest.raises(openai.NotFoundError) as info:
                await api.completions.create(model="gpt-4", prompt=PROMPT)
            assert "gpt-4" in info.value.message and info.value.body["param"] == "model"
            ok = await api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                              temperature=0)
            assert ok.usage.completion_tokens >= 1  # the server is unharmed
        finally:
            await _stop(*gw)


async def test_chat_uses_the_tokenizers_template(models, tmp_path):
    folder = tmp_path / "chat-model"
    folder.mkdir()
    shutil.copy(models / TINY_TARGET / "tokenizer.json", folder)
    config = json.loads((models / TINY_TARGET / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config,
                                                              "chat_template": TEMPLATE}))
    messages = [{"role": "user", "content": "Tell me a story."}]
    prompt = ChatTemplate.from_model_dir(folder).render(messages)
    assert prompt == "user: Tell me a story.\nassistant:"
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(folder)) as lib:
            want = await lib.generate(prompt, 16, temperature=0.0, ignore_eos=True)
        gw = await _gateway(verify, draft, folder)
        try:
            got = await gw[2].chat.completions.create(
                model="chat-model", messages=messages, max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
            assert got.choices[0].message.content == want.text
            assert got.choices[0].message.role == "assistant"
            stream = await gw[2].chat.completions.create(
                model="chat-model@1", messages=messages, max_tokens=16, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert text == want.text
        finally:
            await _stop(*gw)
