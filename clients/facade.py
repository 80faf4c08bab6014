"""One client API whatever is behind it (`from specmesh import Client, AsyncClient, launch`).

    async with AsyncClient("127.0.0.1:50051") as c:                  # a gateway
    async with AsyncClient(verify="h:p", draft="h:p", cache="h:p",
                           tokenizer="models/x") as c:                # the services directly
        result = await c.generate("Once upon a time", max_new_tokens=32)
        async for text in c.stream("Once upon a time", temperature=0.8, seed=1): ...

    with specmesh.launch(target="models/x", draft="models/y") as client:   # a local stack
        print(client.generate("Once upon a time").text)

`generate()` returns a GenerationResult (text, token ids, finish reason, stats); `stream()` yields
text deltas. Both take `params=GenerationParams(...)` and/or keyword overrides (a keyword you do
not pass never overrides `params`). Failures are the library's own exceptions
(`specmesh.errors`), never raw gRPC errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import threading
from collections.abc import AsyncIterator, Iterator

import grpc

from specmesh.clients.async_client import AsyncSpecMeshClient, StreamEvent, _params
from specmesh.clients.gateway_client import GatewayClient
from specmesh.clients.types import GenerationParams, GenerationResult
from specmesh.wire.errors import error_from_rpc
from specmesh.wire.security import Security


class AsyncClient:
    def __init__(self, target: str | None = None, *, verify: str | None = None,
                 draft: str | None = None, cache: str | None = None,
                 tokenizer: str | pathlib.Path | None = None,
                 security: Security | None = None, model: str = ""):
        """`target`: a gateway's host:port; or `verify` (+ `draft`, `cache`, `tokenizer`: the
        model folder, for text prompts) to run speculation in this process. `security`: TLS
        CA, bearer token (default: SPECMESH_TLS_CA, SPECMESH_TOKEN, ... from the environment).
        `model`: through a gateway, the model every request asks for ("name", "name@version";
        "" = the gateway's default)."""
        if (target is None) == (verify is None):
            raise ValueError("give a gateway address, or verify= (and draft=, cache=)")
        if model and target is None:
            raise ValueError("model= picks a gateway's model; give the gateway address")
        self._impl = GatewayClient(target, security=security, model=model) \
            if target is not None \
            else AsyncSpecMeshClient(verify, draft, str(tokenizer) if tokenizer else None,
                                     cache_addr=cache, security=security)

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            await self._impl.connect()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    async def close(self) -> None:
        await self._impl.close()

    async def generate(self, prompt: str | list[int], params: GenerationParams | None = None,
                       **overrides) -> GenerationResult:
        result = None
        async for ev in self._events(prompt, params, overrides):
            result = ev.result or result
        return result

    async def stream(self, prompt: str | list[int], params: GenerationParams | None = None,
                     **overrides) -> AsyncIterator[str]:
        async for ev in self._events(prompt, params, overrides):
            if ev.text:
                yield ev.text

    async def _events(self, prompt, params, overrides) -> AsyncIterator[StreamEvent]:
        p = _params(params, None, dict(overrides))
        try:
            async for ev in self._impl.stream(prompt, params=p):
                yield ev
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None


class Client:
    """AsyncClient's blocking face (its own event-loop thread); usable from many threads.
    `stack`: a LocalStack to start first and stop on close (what `launch` passes)."""

    def __init__(self, target: str | None = None, *, stack=None, **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="specmesh-client")
        self._thread.start()
        self._stack = stack
        try:
            if stack is not None:  # started from this thread: its services live as long
                self._call(stack.__aenter__())
                kwargs = dict(verify=stack.verify_addr, draft=stack.draft_addr,
                              cache=stack.cache_addr, tokenizer=stack.target_dir)
            self._client = self._call(_connected(target, kwargs))
        except BaseException:
            if stack is not None:
                stack.stop()
            self._stop_loop()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | list[int], params: GenerationParams | None = None,
                 **overrides) -> GenerationResult:
        return self._call(self._client.generate(prompt, params, **overrides))

    def stream(self, prompt: str | list[int], params: GenerationParams | None = None,
               **overrides) -> Iterator[str]:
        agen = self._client.stream(prompt, params, **overrides)
        try:
            while True:
                try:
                    yield self._call(anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            if self._stack is not None:
                self._stack.stop()
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _connected(target, kwargs) -> AsyncClient:
    client = AsyncClient(target, **kwargs)
    await client.connect()
    return client


@contextlib.contextmanager
def launch(target: str | pathlib.Path | None = None, draft: str | pathlib.Path | None = None,
           cache: bool = False, ngram_fleet: bool = False, device: str = "cpu",
           dtype: str | None = None) -> Iterator[Client]:
    """Start a local stack (verify, draft, optionally the cache with an embedded Redis) as
    subprocesses, yield a Client on it, stop everything on exit. `target`/`draft`: model
    folders or names under $SPECMESH_MODEL_DIR (default: the bundled pair); draft="ngram"
    drafts by n-gram lookup, no draft model (any tree spec then sizes its n-gram tree).
    `ngram_fleet` (with `cache`): n-gram trees also draw on the fleet table in Redis, keyed by
    the target model (`specmesh.clients.model_key`). `device`/`dtype`: where and in what
    precision both model services run (`device="cuda", dtype="bfloat16"` on a GPU)."""
    if ngram_fleet and not cache:
        raise ValueError("ngram_fleet: the fleet n-gram table lives in the cache; pass cache=True")
    from specmesh.clients.local_stack import LocalStack
    from specmesh.clients.models import resolve_pair

    target_dir, draft_dir = resolve_pair(target and str(target), draft and str(draft))
    method = "ngram" if draft_dir is None else "model"  # draft="ngram": model-free drafting
    with Client(stack=LocalStack(target_dir, draft_dir, draft_method=method,
                                 cache=cache, ngram_fleet=ngram_fleet, device=device,
                                 dtype=dtype)) as client:
        yield client
