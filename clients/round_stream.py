"""A batch method (ProposeBatch, VerifyBatch) carried over one long-lived bidi stream.

    verify = RoundStream(stub.VerifyStream, stub.VerifyBatch)
    reply = await verify(request, timeout=60)   # as `await stub.VerifyBatch(request, timeout=60)`

gRPC Python spends ~0.8 ms on a unary call's round trip on loopback after an idle gap (call
setup, metadata, completion queues on both sides) and ~0.4 ms on a message of an open stream; a
client's round makes two such trips. Each call writes one request on the stream and reads its
response (the service answers in order, one response per request); calls are serialised.

Any failure fails that call with the AioRpcError a unary call would raise (the stream's status,
DEADLINE_EXCEEDED after `timeout`, UNAVAILABLE when the stream ends early or the service
cancels it at its stop) and drops the stream,
whose next response could no longer be matched to its request: the next call opens a new one.
A service without the stream method (UNIMPLEMENTED) is called unary from then on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def _within(timeout: float | None, work):
    """Await `work` (a coroutine); asyncio.TimeoutError after `timeout` s (None: no limit)."""
    if timeout is None:
        return await work
    if hasattr(asyncio, "timeout"):  # Python 3.11+: no task per call
        async with asyncio.timeout(timeout):
            return await work
    return await asyncio.wait_for(work, timeout)


class RoundStream:
    """`await stream(request, timeout=None)` -> the method's response, over one open stream."""

    def __init__(self, open_stream: Callable[[], Any], unary: Callable[..., Any]):
        """open_stream: the stub's stream method (called with no arguments to open one);
        unary: the same method as a unary call (used when the service lacks the stream)."""
        self._open_stream = open_stream
        self._unary = unary
        self._call = None
        self._lock = asyncio.Lock()
        self.streaming = True  # False once the service answered UNIMPLEMENTED
        self.num_opened = 0

    async def __call__(self, request, timeout: float | None = None):
        if not self.streaming:
            return await self._unary(request, timeout=timeout)
        async with self._lock:
            try:
                return await self._exchange(request, timeout)
            except grpc.aio.AioRpcError as err:
                self.close()
                if err.code() == grpc.StatusCode.CANCELLED:  # by the service (it stopped)
                    raise _rpc_error(grpc.StatusCode.UNAVAILABLE,
                                     f"the service ended the stream ({err.details()})") from None
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.streaming = False
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                self.close()
                raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no response within {timeout} s") from None
            except BaseException:  # cancelled: this request's response would answer the next
                self.close()
                raise
        return await self._unary(request, timeout=timeout)

    async def _exchange(self, request, timeout: float | None):
        if self._call is not None and self._call.done():  # ended between calls (a restart)
            self._call = None
        fresh = self._call is None
        if fresh:
            self._call = self._open_stream()
            self.num_opened += 1
        reply = await _within(timeout, self._write_read(request, fresh))
        if reply is grpc.aio.EOF:
            code = await self._call.code()
            details = await self._call.details()
            raise _rpc_error(code if code != grpc.StatusCode.OK else grpc.StatusCode.UNAVAILABLE,
                             details or "the stream ended before answering")
        return reply

    async def _write_read(self, request, fresh: bool):
        try:
            await self._call.write(request)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError) as exc:
            if fresh and isinstance(exc, grpc.aio.AioRpcError):
                raise  # refused (UNAUTHENTICATED, UNIMPLEMENTED, unreachable)
            # a stream that served before ended just now (its service stopping)
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE,
                             f"the stream ended before this request ({exc})") from None
        return await self._call.read()

    def close(self) -> None:
        """Cancel the open stream, if any (the next call opens a new one)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None


STREAMS = {"ProposeBatch": "ProposeStream", "VerifyBatch": "VerifyStream"}


def batch_method(stub, unary: str) -> Callable[..., Any]:
    """The stub's `unary` batch method (a key of STREAMS), over a RoundStream when the stub has
    its stream (a generated stub; a ReplicaSet splits batches by replica, each with its own)."""
    stream = STREAMS[unary]
    if not hasattr(stub, stream):
        return getattr(stub, unary)
    return RoundStream(getattr(stub, stream), getattr(stub, unary))
