"""Stock server plumbing, written once: aio server, error interceptor, health, reflection, stop.

    server = await build_server([(add_FooServicer_to_server, servicer)], [FOO_SERVICE_NAME],
                                port=0)
    await server.start()           # server.port is the bound port
    await server.set_serving(True)  # once the model is loaded
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specmesh.wire.errors import SpecMeshError, status_code
from specmesh.wire.open_streams import OpenStreams
from specmesh.wire.security import Security

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # clients' receive limit; each server sets its own
MAX_CONCURRENT_RPCS = 1024  # per server; more in flight get RESOURCE_EXHAUSTED


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel/server options capping one message each way; a bigger one is refused with
    RESOURCE_EXHAUSTED before it is decoded."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


CHANNEL_OPTIONS = message_options(MAX_MESSAGE_BYTES)  # Security.channel adds its own


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SpecMeshError):
        return status_code(exc), str(exc)
    if isinstance(exc, NotImplementedError):  # a generated servicer base's method
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "method not implemented"
    if isinstance(exc, DecodeError):  # a streamed request message that does not parse
        return grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({exc})"
    log.exception("unhandled error in handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}; see the service log)"


class _Undecodable:
    """What a request that failed to parse becomes, so the handler can answer
    INVALID_ARGUMENT instead of gRPC's UNKNOWN."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def run(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, bad UTF-8, ...
            return _Undecodable(exc)
    return run


async def _reject_undecodable(request, context) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request: not a valid message of this method ({request.error})")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps SpecMeshError subclasses to their status codes; anything else becomes INTERNAL.

    The handler's exception never escapes, so one bad request cannot take the server down.
    Bidi streams read their requests through `streams` (ended by a graceful stop).
    """

    def __init__(self, streams: OpenStreams | None = None):
        self.streams = streams or OpenStreams()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, check_request=True),
                _tolerant(handler.request_deserializer), handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, check_request=True),
                _tolerant(handler.request_deserializer), handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(self.streams.wrap(handler.stream_stream), check_request=False),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _guard_unary(handler.stream_unary, check_request=False),
                handler.request_deserializer, handler.response_serializer)
        return handler


async def _abort_with_status(context, exc: Exception) -> None:
    code, msg = _status_of(exc)
    await context.abort(code, msg)


def _guard_unary(inner: Callable, check_request: bool) -> Callable:
    """A handler returning one response, whose exceptions become statuses."""

    async def handler(request, context):
        if check_request:
            await _reject_undecodable(request, context)
        try:
            return await inner(request, context)
        except (grpc.aio.AbortError, grpc.aio.BaseError):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary of the service
            await _abort_with_status(context, exc)

    return handler


def _guard_stream(inner: Callable, check_request: bool) -> Callable:
    """A handler streaming responses, whose exceptions become statuses (a streamed request
    message that does not parse: INVALID_ARGUMENT, through `_status_of`)."""

    async def handler(request, context):
        if check_request:
            await _reject_undecodable(request, context)
        try:
            async for item in inner(request, context):
                yield item
        except (grpc.aio.AbortError, grpc.aio.BaseError):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary of the service
            await _abort_with_status(context, exc)

    return handler


@dataclass
class Server:
    """A started-or-not aio server with its health servicer and bound port."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    streams: OpenStreams

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: report NOT_SERVING, let in-flight RPCs finish for `grace` seconds, stop
        (open bidi streams: after their answer in progress, at once when idle)."""
        await self.health.enter_graceful_shutdown()
        self.streams.stop()
        await self.server.stop(grace)


async def build_server(
    servicers: Iterable[tuple[Callable, object]],
    service_names: Sequence[str],
    port: int = 0,
    host: str = "127.0.0.1",
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_concurrent_rpcs: int | None = MAX_CONCURRENT_RPCS,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    security: Security | None = None,
) -> Server:
    """Build an aio server with the error interceptor, health (NOT_SERVING) and reflection;
    `security` adds TLS (its credentials, unless `credentials` is given), bearer-token
    authentication and can turn reflection off (specmesh.wire.security).

    port=0 binds a free port; the bound one is returned in `Server.port`. RPCs beyond
    `max_concurrent_rpcs` in flight, and messages over `max_message_bytes`, are refused with
    RESOURCE_EXHAUSTED by gRPC itself.
    """
    # SO_REUSEPORT off: a second server on a taken port fails instead of splitting traffic
    security = security or Security()
    credentials = credentials or security.server_credentials()
    streams = OpenStreams()
    server = grpc.aio.server(
        interceptors=[*security.interceptors(), ErrorInterceptor(streams), *interceptors],
        options=[*message_options(max_message_bytes), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    for add, servicer in servicers:
        add(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(service_names)
    if security.reflection:
        reflection.enable_server_reflection(
            (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials
             else server.add_insecure_port(address))
    out = Server(server=server, port=bound, health=health_servicer, service_names=names,
                 streams=streams)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return out


async def wait_for_serving(address: str, timeout: float = 60.0,
                           security: Security | None = None) -> None:
    """Poll the health service at `address` until it reports SERVING (or raise TimeoutError);
    `security` for a TLS server (health needs no token)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    async with (security or Security()).channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            await asyncio.sleep(0.1)


async def serve_until_signal(server: Server, grace: float = 5.0,
                             ready_line: str | None = None, on_hup=None) -> None:
    """Block until SIGINT/SIGTERM, then stop gracefully. Prints `ready_line` once listening.
    `on_hup`: an async callable run on each SIGHUP (e.g. reload a config file)."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handlers = [(signal.SIGINT, stop.set), (signal.SIGTERM, stop.set)]
    if on_hup is not None:
        tasks: set = set()

        def hup() -> None:
            task = loop.create_task(on_hup())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        handlers.append((signal.SIGHUP, hup))
    for sig, handler in handlers:
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if ready_line:
        print(ready_line, flush=True)
    await stop.wait()
    await server.stop(grace)


def die_with_parent() -> None:
    """A child of a local stack (SPECMESH_PARENT_PID set by clients.local_stack): exit when
    the process that started it dies (Linux PR_SET_PDEATHSIG), so a killed client never leaves
    services behind. Set here, in the child, not in a preexec_fn: forking a process that has
    gRPC threads and running Python before exec can abort the child."""
    parent = os.environ.get("SPECMESH_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def run(coro: Awaitable) -> None:
    """A service process's main: INFO logging, run `coro` until it returns or Ctrl-C."""
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
