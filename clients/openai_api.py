"""OpenAI-compatible HTTP API over an AsyncSpecMeshClient (FastAPI; served by the gateway).

    POST /v1/completions        prompt -> text (stream: server-sent events ending in [DONE])
    POST /v1/chat/completions   messages -> the tokenizer's chat template -> text
    GET  /v1/models, GET /health

OpenAI's fields and defaults (max_tokens 16, temperature 1, n 1 only), plus ours as extra body
fields: `tree` ("chain:4", "dynamic:8", "none"), `speculate`, `adaptive`, `top_k`, `ignore_eos`,
`priority` ("interactive", "batch"; or the `X-Priority` header). `model` picks the model
("name" or "name@version", clients/registry.py; absent = the gateway's default; unknown = 404).
A field we do not support is a 400 that names it; so is a bad value. Errors have OpenAI's shape.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from specmesh.clients.async_client import StreamEvent
from specmesh.clients.model_router import ModelRouter, Route
from specmesh.clients.types import GenerationParams
from specmesh.errors import InvalidRequest, SpecMeshError
from specmesh.wire.metrics import ServiceMetrics
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
    priority: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


def _params(req: _Sampling, defaults: GenerationParams, max_tokens: int | None,
            priority: str | None = None) -> GenerationParams:
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
            adaptive=defaults.adaptive if req.adaptive is None else req.adaptive,
            priority=req.priority or priority or defaults.priority)
    except InvalidRequest as exc:  # GenerationParams' names -> this API's
        field = "max_tokens" if exc.field == "max_new_tokens" else exc.field
        raise InvalidRequest(field, exc.problem) from exc


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {
        "message": message, "type": kind, "param": param, "code": None}})


def build_app(router: ModelRouter, tokens: TokenTable | None = None,
              metrics: ServiceMetrics | None = None) -> FastAPI:
    """The HTTP app over the gateway's models (/v1/models lists each name and name@version).
    With `tokens`, every path but /health needs `Authorization: Bearer <token>` (the OpenAI
    client's api_key) of any role: 401 otherwise. `metrics`: per model and class."""
    api = _Api(router, metrics)
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
    def __init__(self, router: ModelRouter, metrics: ServiceMetrics | None):
        self.router, self.metrics = router, metrics

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
        ids = self.router.registry.names() + self.router.registry.keys()
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                            "owned_by": "specmesh"} for i in ids]}

    async def completions(self, req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequest("prompt", "empty prompt")
        return await self._respond(req, request, lambda route: prompt, req.max_tokens,
                                   "text_completion")

    async def chat_completions(self, req: ChatRequest, request: Request):
        def prompt(route: Route) -> list[int]:
            if route.chat is None:
                raise InvalidRequest("messages", f"model {route.entry.key!r} has no chat "
                                     "template; use /v1/completions")
            return route.chat.encode(req.messages, route.client.codec)
        return await self._respond(req, request, prompt,
                                   req.max_completion_tokens or req.max_tokens, "chat.completion")

    async def _respond(self, req: _Sampling, request: Request, prompt_of, max_tokens: int | None,
                       kind: str):
        """Route, generate, answer (JSON or server-sent events); the route is held until the
        last event is sent."""
        stack = contextlib.AsyncExitStack()
        route = await stack.enter_async_context(self.router.use(req.model or ""))
        try:
            params = route.check(_params(req, route.defaults, max_tokens,
                                         request.headers.get("x-priority")))
            meta = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-"
                          f"{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": route.entry.key}
            events = self._observed(route, params, route.client.stream(prompt_of(route),
                                                                      params=params))
            if req.stream:
                first = await anext(events)  # errors before any byte are plain HTTP errors
                usage = bool((req.stream_options or {}).get("include_usage"))
                body = _sse(first, events, meta, kind, usage, stack)
                stack = None  # the stream closes it
                return StreamingResponse(body, media_type="text/event-stream")
            result = None
            async for ev in events:
                result = ev.result or result
            return {**meta, "object": kind, "choices": [
                _choice(kind, result.text, FINISH[result.finish_reason])],
                "usage": _usage(result)}
        finally:
            if stack is not None:
                await stack.aclose()

    async def _observed(self, route: Route, params: GenerationParams,
                        events: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        """The events, with the finished generation recorded in the per-model metrics."""
        try:
            async for ev in events:
                if ev.result is not None and self.metrics is not None:
                    s = ev.result.stats
                    self.metrics.observe_generation(
                        route.entry.key, params.priority, len(ev.result.token_ids),
                        s.time_to_first_token_s, s.total_time_s, s.queue_time_s)
                yield ev
        finally:
            await events.aclose()


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
               usage: bool, route: contextlib.AsyncExitStack) -> AsyncIterator[str]:
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
        await route.aclose()
    yield "data: [DONE]\n\n"
