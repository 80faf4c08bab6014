"""SpecMeshClient: the blocking face of AsyncSpecMeshClient (its own event loop thread)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator

from clients.async_client import AsyncSpecMeshClient, StreamEvent
from clients.types import GenerationResult


class SpecMeshClient:
    """Same API as AsyncSpecMeshClient, callable from ordinary (or many) threads."""

    def __init__(self, verify_addr: str, draft_addr: str | None = None,
                 tokenizer_dir: str | None = None):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="specmesh-client")
        self._thread.start()
        self._client = AsyncSpecMeshClient(verify_addr, draft_addr, tokenizer_dir)
        self._run(self._client.connect())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None,
                 **kwargs) -> GenerationResult:
        return self._run(self._client.generate(prompt, max_new_tokens, **kwargs))

    def stream(self, prompt: str | list[int], max_new_tokens: int | None = None,
               **kwargs) -> Iterator[StreamEvent]:
        out: queue.Queue = queue.Queue()
        done = object()

        async def pump():
            try:
                async for ev in self._client.stream(prompt, max_new_tokens, **kwargs):
                    out.put(ev)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                out.put(exc)
            out.put(done)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "SpecMeshClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
