"""EngineWorker: the one thread that touches an engine, fed by a dynamic batcher.

`submit(item)` joins the next batch (merged across all concurrent callers up to
`max_batch_tokens`, waiting at most `max_wait_ms` for company); `call(fn, ...)` runs any other
engine method on the same thread, so the engine never sees two threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class EngineWorker:
    def __init__(self, run_batch: Callable[[list], list], cost: Callable[[Any], int],
                 max_batch_tokens: int = 2048, max_wait_ms: float = 2.0,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._run_batch = run_batch
        self._cost = cost
        self._max_batch_tokens = max_batch_tokens
        self._max_wait_s = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._last_batch_size = 0

    async def call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def submit(self, item):
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        result = await fut
        if isinstance(result, BaseException):
            raise result
        return result

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            batch, tokens = [first], self._cost(first[0])
            # Wait for company only when callers have been arriving together; a lone caller
            # runs at once (items queued during a forward are picked up by the next one).
            wait = self._max_wait_s if self._last_batch_size > 1 else 0.0
            deadline = loop.time() + wait
            while tokens < self._max_batch_tokens:
                try:
                    nxt = self._queue.get_nowait() if loop.time() >= deadline else \
                        await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if tokens + self._cost(nxt[0]) > self._max_batch_tokens:
                    carry = nxt
                    break
                batch.append(nxt)
                tokens += self._cost(nxt[0])
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            self._last_batch_size = len(live)
            start = loop.time()
            try:
                results = await self.call(self._run_batch, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 - the whole batch failed
                results = [exc] * len(live)
            if self._on_batch:
                self._on_batch(len(live), tokens, loop.time() - start)
            for (_, fut), res in zip(live, results):
                if not fut.done():
                    fut.set_result(res)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
