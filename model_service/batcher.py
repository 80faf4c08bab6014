"""DynamicBatcher: merge concurrent requests into batches run on one worker thread.

    batcher = DynamicBatcher(run_batch, cost=lambda item: item.num_tokens,
                             max_batch_tokens=2048, max_wait_ms=2.0,
                             on_batch=metrics.observe_batch)
    await batcher.start()
    result = await batcher.submit(item)      # from any number of concurrent callers
    await batcher.stop()                     # graceful: queued items still run

One consumer task takes items in arrival order. A batch closes when the next item would push it
past `max_batch_tokens` (that item opens the next batch) or `max_wait_ms` after its first item
was taken. `run_batch(items) -> results` is synchronous and always runs on the same single
worker thread, so a model behind it never sees two threads; it returns one result per item, and a
result that is an exception instance is raised to that item's caller only. An exception raised by
`run_batch` itself goes to every caller of the batch. A caller that is cancelled simply loses its
result; the batcher and the other callers carry on. No torch, no gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """submit() after stop() began (or a queued item dropped by stop(drain=False))."""


@dataclass
class _Pending(Generic[Item]):
    item: Item
    cost: int
    future: asyncio.Future
    caller: Any = None  # items of one caller (a batched RPC) share it; None: its own


class DynamicBatcher(Generic[Item, Result]):
    """Batches concurrent `submit()` calls for a synchronous `run_batch` on one thread."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result | BaseException]],
        cost: Callable[[Item], int] = lambda _: 1,
        max_batch_tokens: int = 2048,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int, int, float], None] | None = None,
        wait_only_when_busy: bool = False,
        executor: Executor | None = None,
    ):
        """
        run_batch: items -> one result (or exception instance) per item; runs on the worker.
        cost: token cost of an item (>= 0); an item costing more than the cap runs alone.
        max_batch_tokens: a batch's total cost never exceeds this (except a lone big item).
        max_wait_ms: how long a batch waits for company after its first item.
        on_batch: called after every batch with (num_items, num_tokens, seconds of run_batch).
        wait_only_when_busy: wait for company only if the previous batch came from more than
            one caller, so a lone caller runs at once (items queued during a run join the next
            batch); the items of one batched RPC, submitted with one `caller`, are one caller.
        executor: the single-thread executor to run on (shared with `call`); owned if None.
        """
        if max_batch_tokens <= 0:
            raise ValueError(f"max_batch_tokens: {max_batch_tokens} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms: {max_wait_ms} must be >= 0")
        self._run_batch = run_batch
        self._cost = cost
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._wait_only_when_busy = wait_only_when_busy
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1,
                                                        thread_name_prefix="batcher")
        self._pending: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._last_batch_callers = 0
        self.num_batches = 0
        self.num_items = 0
        self.num_tokens = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (cancelled ones may still be counted until skipped)."""
        return len(self._pending)

    @property
    def queued_tokens(self) -> int:
        return sum(p.cost for p in self._pending)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the consumer task on the running loop (submit() also starts it lazily)."""
        if self._closing:
            raise BatcherClosed("batcher is stopped")
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._consume(),
                                                                name="dynamic-batcher")

    async def stop(self, drain: bool = True) -> None:
        """Refuse new items; run the queued ones (drain) or fail them with BatcherClosed."""
        self._closing = True
        if not drain:
            while self._pending:
                p = self._pending.popleft()
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("batcher stopped before this item ran"))
        if self._task is not None:
            self._wake.set()
            await asyncio.shield(self._task)
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    # -- callers ---------------------------------------------------------------------------
    async def submit(self, item: Item, caller: Any = None) -> Result:
        """Queue `item`, wait for its batch, return its result (or raise its exception).
        `caller`: any hashable shared by the items that one caller submits together."""
        return await self.enqueue(item, caller)

    def enqueue(self, item: Item, caller: Any = None) -> asyncio.Future:
        """Queue `item` now; the future its batch resolves (what `submit` awaits; a batched
        RPC gathers its items' futures without a task per item). Cancel it to withdraw."""
        if self._closing:
            raise BatcherClosed("batcher is stopped")
        cost = int(self._cost(item))
        if cost < 0:
            raise ValueError(f"cost: {cost} must be >= 0")
        self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, cost, future, caller))
        self._wake.set()
        return future

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run any other function on the worker thread (between batches, never beside one)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the consumer ----------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            first = await self._next_live(deadline=None)
            if first is None:
                return  # closing and nothing queued
            batch = await self._collect(first)
            await self._run(batch)

    async def _next_live(self, deadline: float | None) -> _Pending | None:
        """Pop the next item whose caller still waits; None at the deadline or when drained."""
        loop = asyncio.get_running_loop()
        while True:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()  # its caller was cancelled
            if self._pending:
                return self._pending.popleft()
            if self._closing:
                return None
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    async def _collect(self, first: _Pending) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        wait = self.max_wait_s
        if self._closing or (self._wait_only_when_busy and self._last_batch_callers <= 1):
            wait = 0.0
        deadline = loop.time() + wait
        batch, tokens = [first], first.cost
        while tokens < self.max_batch_tokens:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if self._pending and tokens + self._pending[0].cost > self.max_batch_tokens:
                break  # it opens the next batch
            nxt = await self._next_live(deadline)
            if nxt is None:
                break
            if tokens + nxt.cost > self.max_batch_tokens:
                self._pending.appendleft(nxt)
                break
            batch.append(nxt)
            tokens += nxt.cost
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        tokens = sum(p.cost for p in live)
        start = time.perf_counter()
        try:
            results = await self.call(self._run_batch, [p.item for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results "
                                   f"for {len(live)} items")
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: tell every caller
            results = [exc] * len(live)
        seconds = time.perf_counter() - start
        self._last_batch_callers = len({p.future if p.caller is None else p.caller
                                        for p in live})
        self.num_batches += 1
        self.num_items += len(live)
        self.num_tokens += tokens
        for p, res in zip(live, results):
            if p.future.done():
                continue  # cancelled while its batch ran
            if isinstance(res, BaseException):
                p.future.set_exception(res)
            else:
                p.future.set_result(res)
        if self._on_batch is not None:
            try:
                self._on_batch(len(live), tokens, seconds)
            except Exception:  # noqa: BLE001 - metrics must never stop the batcher
                log.exception("on_batch callback failed")
