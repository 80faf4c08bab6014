"""Long-lived bidi streams (VerifyStream, ProposeStream) ended promptly by a graceful stop.

A server's stop waits up to its grace period for the RPCs in flight, and a client's open round
stream is in flight between its requests too: without this, every stop would wait out the whole
grace period. `build_server` wraps each stream-stream handler with `OpenStreams.wrap`;
`Server.stop` calls `OpenStreams.stop()`: a stream waiting for its next request ends at once (status OK: its
client opens a new stream on its next call, and finds the service gone), one answering a
request ends right after that answer, so an answer is never cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable


class OpenStreams:
    def __init__(self):
        self.stopping = False
        self._idle: set[asyncio.Task] = set()  # handler tasks waiting for a request

    def wrap(self, inner: Callable) -> Callable:
        """A stream-stream handler reading its requests through `until_stop`."""
        async def handler(requests, context):
            async for reply in inner(self.until_stop(requests), context):
                yield reply
        return handler

    async def until_stop(self, requests) -> AsyncIterator:
        """The requests of one stream until it ends or the server stops."""
        task = asyncio.current_task()
        it = requests.__aiter__()
        while not self.stopping:
            self._idle.add(task)
            try:
                request = await it.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
                if hasattr(task, "uncancel"):  # ours: end the stream normally (status OK)
                    task.uncancel()
                return
            finally:
                self._idle.discard(task)
            yield request

    def stop(self) -> int:
        """Read no more requests: cancel the streams waiting for one (how many)."""
        self.stopping = True
        idle = list(self._idle)
        for task in idle:
            task.cancel()
        return len(idle)
