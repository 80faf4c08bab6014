"""OpenAI-compatible HTTP API over an AsyncSpecMeshClient (FastAPI; served by the gateway).

    POST /v1/completions        prompt -> text (stream: server-sent events ending in [DONE])
    POST /v1/chat/completions   messages -> the tokenizer's chat template -> text
    GET  /v1/models, GET /health

OpenAI's fields and defaults (max_tokens 16, temperature 1, n 1 only), plus ours as extra body
fields: `tree` ("chain:4", "dynamic:8", "none"), `speculate`, `adaptive`, `top_k`, `ignore_eos`.
A field we do not support is a 400 that names it; so is a bad value. Errors have OpenAI's shape.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from specmesh.clients.async_client import AsyncSpecMeshClient, StreamEvent
from specmesh.clients.chat_template import ChatTemplate
from specmesh.clients.types import GenerationParams
from specmesh.errors import InvalidRequest, SpecMeshError
from specmesh.wire.security import TokenTable, bearer
from specmesh.wire.tree_spec import TreeSpec

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


class _Sampling(BaseModel):
    """Fields both endpoints take; anything else in the body is refused (400 naming it)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # specmesh's own
    top_k: int = 0
    ignore_eos: bool = False
    tree: str | None = None
    speculate: bool | None = None
    adaptive: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


def _params(req: _Sampling, defaults: GenerationParams, max_tokens: int | None
            ) -> GenerationParams:
    if req.n != 1:
        raise InvalidRequest("n", f"{req.n}: only n=1 is supported")
    try:
        tree = TreeSpec.parse(req.tree) if req.tree is not None else defaults.tree
    except ValueError as exc:
        raise InvalidRequest("tree", str(exc)) from exc
    speculate = defaults.speculate if req.speculate is None else req.speculate
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
        return GenerationParams(
            max_new_tokens=16 if max_tokens is None else max_tokens,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            stop=stop, ignore_eos=req.ignore_eos, tree=tree, speculate=speculate and tree.enabled,
            adaptive=defaults.adaptive if req.adaptive is None else req.adaptive)
    except InvalidRequest as exc:  # GenerationParams' names -> this API's
        field = "max_tokens" if exc.field == "max_new_tokens" else exc.field
        raise InvalidRequest(field, exc.problem) from exc


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": None}})


def build_app(client: AsyncSpecMeshClient, defaults: GenerationParams | None = None,
              model_name: str | None = None, chat: ChatTemplate | None = None,
              tokens: TokenTable | None = None) -> FastAPI:
    """The HTTP app; `model_name` is what /v1/models lists (default: the target's name).
    With `tokens`, every path but /health needs `Authorization: Bearer <token>` (the OpenAI
    client's api_key) of any role: 401 otherwise."""
    api = _Api(client, defaults or GenerationParams(), model_name, chat)
    app = FastAPI(title="specmesh", docs_url=None, redoc_url=None)
    if tokens is not None:
        app.middleware("http")(_bearer_check(tokens))
    app.add_exception_handler(RequestValidationError, api.on_bad_body)
    app.add_exception_handler(SpecMeshError, api.on_error)
    app.get("/health")(api.health)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    return app


def _bearer_check(tokens: TokenTable):
    async def check(request: Request, call_next):
        if request.url.path != "/health":
            token = bearer([(k, v) for k, v in request.headers.items()])
            if not token or tokens.role_of(token) is None:
                response = _error(401, "missing or unknown bearer token (the API key)")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return await call_next(request)
    return check


class _Api:
    def __init__(self, client: AsyncSpecMeshClient, defaults: GenerationParams,
                 model_name: str | None, chat: ChatTemplate | None):
        self.client, self.defaults, self.chat = client, defaults, chat
        self.model = model_name or (client.target_info.name if client.target_info else "")

    async def on_bad_body(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "extra_forbidden":
            return _error(400, f"{loc}: not supported by this server", loc)
        return _error(400, f"{loc}: {first.get('msg', 'invalid')}", loc or None)

    async def on_error(self, request: Request, exc: SpecMeshError) -> JSONResponse:
        return _error(HTTP_STATUS.get(exc.code, 500), str(exc),
                      getattr(exc, "field", None))

    async def health(self) -> dict:
        return {"status": "ok"}

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model",
                                            "created": 0, "owned_by": "specmesh"}]}

    async def completions(self, req: CompletionRequest):
        params = _params(req, self.defaults, req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequest("prompt", "empty prompt")
        return await self._respond(req, prompt, params, "text_completion")

    async def chat_completions(self, req: ChatRequest):
        if self.chat is None:
            raise InvalidRequest("messages", f"model {self.model!r} has no chat template; "
                                 "use /v1/completions")
        params = _params(req, self.defaults, req.max_completion_tokens or req.max_tokens)
        ids = self.chat.encode(req.messages, self.client.codec)
        return await self._respond(req, ids, params, "chat.completion")

    async def _respond(self, req: _Sampling, prompt, params: GenerationParams, kind: str):
        meta = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self.model}
        events = self.client.stream(prompt, params=params)
        if req.stream:
            first = await anext(events)  # errors before any byte is sent are plain HTTP errors
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(first, events, meta, kind, usage),
                                     media_type="text/event-stream")
        result = None
        async for ev in events:
            result = ev.result or result
        return {**meta, "object": kind, "choices": [_choice(kind, result.text,
                                                            FINISH[result.finish_reason])],
                "usage": _usage(result)}


def _choice(kind: str, text: str, finish: str | None, delta: bool = False) -> dict:
    if kind == "text_completion":
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    body = {"role": "assistant", "content": text}
    return {"index": 0, ("delta" if delta else "message"): body, "finish_reason": finish,
            "logprobs": None}


def _usage(result) -> dict:
    prompt, completion = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def _sse(first: StreamEvent, events: AsyncIterator[StreamEvent], meta: dict, kind: str,
               usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per round, the finish reason on the last, then [DONE]."""
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

    def data(body: dict) -> str:
        return f"data: {json.dumps({**meta, 'object': chunk_kind, **body})}\n\n"

    ev, result = first, None
    try:
        while ev is not None:
            finish = FINISH[ev.finish_reason] if ev.finish_reason else None
            yield data({"choices": [_choice(kind, ev.text, finish, delta=True)]})
            result = ev.result or result
            ev = await anext(events, None)
        if usage and result is not None:
            yield data({"choices": [], "usage": _usage(result)})
    except SpecMeshError as exc:  # after the headers: report in the stream, then end it
        yield f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.code}})}\n\n"
    finally:
        await events.aclose()  # a client that went away cancels its generation
    yield "data: [DONE]\n\n"
