"""DynamicBatcher: merging, token caps, error isolation, cancellation, graceful stop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from specmesh.model_service.batcher import BatcherClosed, DynamicBatcher


class Recorder:
    """A run_batch that records each batch and the thread it ran on."""

    def __init__(self, delay_s: float = 0.0, fail_on=None, raise_on=None):
        self.batches: list[list] = []
        self.threads: set[int] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on  # item -> per-item ValueError
        self.raise_on = raise_on  # item -> whole batch raises
        self.started = threading.Event()

    def __call__(self, items):
        self.started.set()
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.raise_on is not None and self.raise_on in items:
            raise RuntimeError("whole batch failed")
        return [ValueError(f"bad {x}") if x == self.fail_on else x * 10 for x in items]


async def test_concurrent_callers_merge_into_one_batch():
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_batch_tokens=100, max_wait_ms=50)
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    await batcher.stop()
    assert results == [i * 10 for i in range(8)]
    assert rec.batches == [list(range(8))]
    assert batcher.num_batches == 1 and batcher.num_items == 8 and batcher.num_tokens == 8


async def test_token_cap_splits_batches_in_order():
    rec = Recorder()
    seen = []
    batcher = DynamicBatcher(rec, cost=lambda x: x, max_batch_tokens=10, max_wait_ms=50,
                             on_batch=lambda n, t, s: seen.append((n, t)))
    items = [4, 5, 3, 7, 2, 20, 1]
    results = await asyncio.gather(*(batcher.submit(i) for i in items))
    await batcher.stop()
    assert results == [i * 10 for i in items]
    # 4+5 = 9 (3 would make 12); 3+7 = 10; 2 alone (20 exceeds); 20 alone (over the cap); 1
    assert rec.batches == [[4, 5], [3, 7], [2], [20], [1]]
    assert seen == [(2, 9), (2, 10), (1, 2), (1, 20), (1, 1)]


async def test_max_wait_closes_a_batch():
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_batch_tokens=100, max_wait_ms=20)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.2)  # well past max_wait: the first batch has run alone
    assert await first == 10
    assert await batcher.submit(2) == 20
    await batcher.stop()
    assert rec.batches == [[1], [2]]


async def test_runs_on_one_worker_thread():
    rec = Recorder(delay_s=0.005)
    batcher = DynamicBatcher(rec, cost=lambda x: 1, max_batch_tokens=3, max_wait_ms=1)
    await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    on_worker = await batcher.call(threading.get_ident)
    await batcher.stop()
    assert len(rec.threads) == 1
    assert rec.threads == {on_worker}
    assert threading.get_ident() not in rec.threads
    assert all(len(b) <= 3 for b in rec.batches)


async def test_per_item_error_goes_to_its_caller_only():
    rec = Recorder(fail_on=3)
    batcher = DynamicBatcher(rec, max_batch_tokens=100, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)),
                                   return_exceptions=True)
    await batcher.stop()
    assert len(rec.batches) == 1
    assert isinstance(results[3], ValueError) and str(results[3]) == "bad 3"
    assert [r for i, r in enumerate(results) if i != 3] == [0, 10, 20, 40, 50]


async def test_whole_batch_error_goes_to_every_caller_of_that_batch():
    rec = Recorder(raise_on=2)
    batcher = DynamicBatcher(rec, cost=lambda x: 1, max_batch_tokens=3, max_wait_ms=50)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(6)),
                                   return_exceptions=True)
    assert rec.batches == [[0, 1, 2], [3, 4, 5]]
    assert all(isinstance(r, RuntimeError) for r in results[:3])
    assert results[3:] == [30, 40, 50]
    assert await batcher.submit(7) == 70  # still serving
    await batcher.stop()


async def test_wrong_number_of_results_fails_the_batch_not_the_batcher():
    calls = []

    def run(items):
        calls.append(items)
        return [] if len(calls) == 1 else [x for x in items]

    batcher = DynamicBatcher(run, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await batcher.submit(1)
    assert await batcher.submit(2) == 2
    await batcher.stop()


async def test_cancelled_caller_while_queued_is_skipped():
    rec = Recorder(delay_s=0.1)
    batcher = DynamicBatcher(rec, cost=lambda x: 1, max_batch_tokens=1, max_wait_ms=0)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 2.0)
    doomed = asyncio.ensure_future(batcher.submit(2))
    kept = asyncio.ensure_future(batcher.submit(3))
    await asyncio.sleep(0)
    doomed.cancel()
    assert await first == 10 and await kept == 30
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await batcher.stop()
    assert rec.batches == [[1], [3]]  # the cancelled item never reached run_batch


async def test_cancelled_caller_while_running_does_not_break_the_batch():
    rec = Recorder(delay_s=0.1)
    batcher = DynamicBatcher(rec, max_batch_tokens=100, max_wait_ms=20)
    doomed = asyncio.ensure_future(batcher.submit(1))
    kept = asyncio.ensure_future(batcher.submit(2))
    await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 2.0)
    doomed.cancel()
    assert await kept == 20
    assert doomed.cancelled()
    assert await batcher.submit(4) == 40
    await batcher.stop()
    assert rec.batches == [[1, 2], [4]]


async def test_stop_drains_queued_items_and_refuses_new_ones():
    rec = Recorder(delay_s=0.02)
    batcher = DynamicBatcher(rec, cost=lambda x: 1, max_batch_tokens=2, max_wait_ms=0)
    futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(7)]
    await asyncio.sleep(0)
    await batcher.stop()
    assert [f.result() for f in futures] == [i * 10 for i in range(7)]
    assert sum(len(b) for b in rec.batches) == 7
    assert not batcher.running
    with pytest.raises(BatcherClosed):
        await batcher.submit(9)


async def test_stop_without_drain_fails_queued_items():
    rec = Recorder(delay_s=0.1)
    batcher = DynamicBatcher(rec, cost=lambda x: 1, max_batch_tokens=1, max_wait_ms=0)
    running = asyncio.ensure_future(batcher.submit(1))
    await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 2.0)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    await batcher.stop(drain=False)
    assert running.result() == 10  # the batch already running completes
    for f in queued:
        with pytest.raises(BatcherClosed):
            f.result()
    assert rec.batches == [[1]]


async def test_wait_only_when_busy_runs_a_lone_caller_at_once():
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_wait_ms=5000, wait_only_when_busy=True)
    t0 = time.perf_counter()
    assert await batcher.submit(1) == 10
    assert time.perf_counter() - t0 < 1.0
    await batcher.stop()


async def test_one_callers_items_do_not_wait_for_company():
    """A batched RPC's items (one caller) run at once, round after round; two callers in the
    last batch make the next one wait for company."""
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_wait_ms=400, wait_only_when_busy=True)
    rpc = object()
    for _ in range(3):
        t0 = time.perf_counter()
        assert await asyncio.gather(*(batcher.submit(i, rpc) for i in range(4))) == [0, 10, 20, 30]
        assert time.perf_counter() - t0 < 0.2
    assert rec.batches == [[0, 1, 2, 3]] * 3
    a, b = object(), object()
    await asyncio.gather(batcher.submit(1, a), batcher.submit(2, b))  # two callers ...
    t0 = time.perf_counter()
    await batcher.submit(3, a)  # ... so this batch waits for company
    assert time.perf_counter() - t0 >= 0.35
    await batcher.stop()


async def test_on_batch_failure_is_logged_not_fatal():
    def bad_callback(n, t, s):
        raise RuntimeError("metrics down")

    batcher = DynamicBatcher(Recorder(), on_batch=bad_callback, max_wait_ms=0)
    assert await batcher.submit(1) == 10
    assert await batcher.submit(2) == 20
    await batcher.stop()


async def test_queue_depth_counts_waiting_items():
    rec = Recorder(delay_s=0.1)
    batcher = DynamicBatcher(rec, cost=lambda x: x, max_batch_tokens=1, max_wait_ms=0)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.get_running_loop().run_in_executor(None, rec.started.wait, 2.0)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert batcher.queue_depth == 2 and batcher.queued_tokens == 5
    await asyncio.gather(first, *rest)
    assert batcher.queue_depth == 0
    await batcher.stop()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        DynamicBatcher(lambda xs: xs, max_batch_tokens=0)
    with pytest.raises(ValueError, match="max_wait_ms"):
        DynamicBatcher(lambda xs: xs, max_wait_ms=-1)


async def test_enqueued_futures_batch_together_and_a_cancelled_one_is_skipped():
    """`enqueue` (what a batched RPC gathers, no task per item) queues at once: the items run
    in one batch; a future cancelled before its batch runs is left out of it."""
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_wait_ms=0, wait_only_when_busy=True)
    rpc = object()
    futures = [batcher.enqueue(i, rpc) for i in range(4)]
    futures[2].cancel()
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[:2] == [0, 10] and results[3] == 30
    assert isinstance(results[2], asyncio.CancelledError)
    assert rec.batches == [[0, 1, 3]]
    await batcher.stop()
    with pytest.raises(BatcherClosed):
        batcher.enqueue(5)


async def test_an_item_refused_at_submission_fails_alone():
    """run_items: a submit that raises at once (a stopping batcher) fails only its item."""
    from specmesh.v1 import common_pb2, verify_pb2
    from specmesh.wire.batch_rpc import run_items

    requests = [verify_pb2.VerifyRequest(header=common_pb2.SequenceHeader(sequence_id=s))
                for s in ("a", "refused", "c")]

    def submit(item):
        if item == "refused":
            raise BatcherClosed("batcher is stopped")
        future = asyncio.get_running_loop().create_future()
        future.set_result(item.upper())
        return future

    outcomes = await run_items(requests, lambda r: r.header.sequence_id, submit)
    assert outcomes[0] == "A" and outcomes[2] == "C"
    assert isinstance(outcomes[1], BatcherClosed)
