"""An ASGI app served by uvicorn on the running event loop, beside the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the process's own handlers stop everything, uvicorn included
        yield


class HttpServer:
    def __init__(self, server: _Server, task: asyncio.Task, port: int):
        self._server, self._task, self.port = server, task, port

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def start_http(app, host: str = "127.0.0.1", port: int = 0, *,
                     ssl_certfile: str | None = None, ssl_keyfile: str | None = None
                     ) -> HttpServer:
    """Bind (port 0 picks a free one), start serving (HTTPS with a certificate and key),
    return once it accepts connections."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # raises the start-up error
        await asyncio.sleep(0.01)
    return HttpServer(server, task, sock.getsockname()[1])
