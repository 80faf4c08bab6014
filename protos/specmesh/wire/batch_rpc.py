"""Batched RPCs (ProposeBatch / VerifyBatch): many items in, one outcome per item out.

    outcomes = await run_items(request.requests, to_item, submit)
    # outcomes[i] is item i's engine result or the exception that failed it (only it)

Items are decoded one by one (a bad one fails alone, with a status naming its field), duplicate
sequence ids in one call are refused per item (the second and later), and the good items are
submitted together so the service's batcher runs them in one forward. `item_error` turns a
failure into the wire's `ItemError`: SpecMeshError keeps its code; anything else is logged and
becomes INTERNAL with a short message. No torch here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from specmesh.v1 import common_pb2
from specmesh.wire.errors import InvalidRequest, SpecMeshError, status_code

log = logging.getLogger(__name__)


async def run_items(requests: Sequence[Any], to_item: Callable[[Any], Any],
                    submit: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """Decode, de-duplicate and submit every request; one result or exception per request.
    `submit(item)` returns an awaitable (a future: no task is made for it)."""
    outcomes: list[Any] = [None] * len(requests)
    seen: set[str] = set()
    todo: list[tuple[int, Any]] = []
    for i, req in enumerate(requests):
        seq_id = req.header.sequence_id
        if seq_id in seen:
            outcomes[i] = InvalidRequest(f"requests[{i}].header.sequence_id",
                                         f"{seq_id!r} appears more than once in this batch")
            continue
        seen.add(seq_id)
        try:
            todo.append((i, to_item(req)))
        except Exception as exc:  # noqa: BLE001 - confined to this item
            outcomes[i] = exc
    waits = []
    for _, item in todo:
        try:
            waits.append(submit(item))
        except Exception as exc:  # noqa: BLE001 - refused at once (a stopping batcher)
            waits.append(_failed(exc))
    results = await asyncio.gather(*waits, return_exceptions=True)
    for (i, _), res in zip(todo, results):
        if isinstance(res, asyncio.CancelledError):
            raise res
        outcomes[i] = res
    return outcomes


def _failed(exc: BaseException) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def item_error(exc: BaseException) -> common_pb2.ItemError:
    """The wire form of one item's failure (never UNKNOWN; internals stay in the log)."""
    if isinstance(exc, SpecMeshError):
        return common_pb2.ItemError(code=status_code(exc).value[0], message=str(exc))
    log.error("unhandled error in a batch item", exc_info=exc)
    return common_pb2.ItemError(code=grpc.StatusCode.INTERNAL.value[0],
                                message=f"internal error ({type(exc).__name__})")


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def item_rpc_error(err: common_pb2.ItemError) -> grpc.aio.AioRpcError:
    """Client side: an item's failure as the AioRpcError a single-item RPC would have raised."""
    code = _CODES.get(err.code, grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), err.message)
