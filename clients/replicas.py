"""Several replicas of one model service behind one stub-like object, with sequence affinity.

    verify = ReplicaSet.connect("h1:50053,h2:50053", verify_pb2_grpc.VerifyServiceStub)
    verify = ReplicaSet.connect("dns:///verify.specmesh.svc:50053", ...)  # every A record,
                                                                         # re-resolved every 10 s
    await verify.VerifyBatch(request, timeout=...)   # same calls as the generated stub

Each sequence is pinned to one replica: on first sight by rendezvous hashing of its id over the
live replicas (new sequences spread, and the choice is stable), then kept there, so its KV stays
where it is. A batched call is split by replica and the parts run concurrently. A replica that
fails a call (UNAVAILABLE, DEADLINE_EXCEEDED) is taken out: its items of that call come back as
NOT_FOUND (the client then resends their full context, the path an eviction takes) and its
sequences move to the live replicas. A background probe of the standard health service brings it
back when it reports SERVING; sequences already moved stay where they are.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.clients.round_stream import batch_method
from specmesh.v1 import common_pb2, draft_pb2, verify_pb2
from specmesh.wire.security import Security
from specmesh.wire.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)
_FAILOVER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def expand(target: str) -> list[str]:
    """'h1:p,h2:p' -> both; 'dns:///name:port' -> one host:port per address it resolves to."""
    out: list[str] = []
    for part in (p.strip() for p in target.split(",")):
        if part.startswith("dns:///"):
            host, _, port = part[len("dns:///"):].rpartition(":")
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            out += sorted({f"[{i[4][0]}]:{port}" if ":" in i[4][0] else f"{i[4][0]}:{port}"
                           for i in infos})
        elif part:
            out.append(part)
    return out


def rendezvous(seq_id: str, addresses: Sequence[str]) -> str:
    """The address with the highest hash of (address, id): stable as replicas come and go."""
    return max(addresses, key=lambda a: hashlib.blake2b(f"{a}\0{seq_id}".encode(),
                                                        digest_size=8).digest())


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: object
    alive: bool = True
    down_since: float | None = None
    items_served: int = 0  # batch items answered (the spread across replicas)
    calls: dict = field(default_factory=dict)  # batch method -> its call (over a RoundStream)

    def batch_call(self, method: str):
        """The replica's `method` (ProposeBatch, VerifyBatch) over its own open stream."""
        if method not in self.calls:
            self.calls[method] = batch_method(self.stub, method)
        return self.calls[method]


@dataclass
class ReplicaSet:
    replicas: list[Replica]
    probe_interval_s: float = 0.5
    pinned: dict[str, str] = field(default_factory=dict)  # seq_id -> address
    stalls: list[float] = field(default_factory=list)  # seconds each failed replica was out
    target: str = ""  # what it was built from; dns:/// names are re-resolved by refresh()
    make_stub: Callable | None = None
    security: Security | None = None
    resolve_every_s: float = 10.0
    _probe: asyncio.Task | None = None
    _resolved_at: float = 0.0

    @classmethod
    def connect(cls, target: str, make_stub: Callable, security: Security | None = None,
                **kwargs) -> "ReplicaSet":
        made = cls([], target=target, make_stub=make_stub, security=security or Security(),
                   **kwargs)
        made.refresh()
        if not made.replicas:
            raise ValueError(f"no replica addresses in {target!r}")
        return made

    def refresh(self) -> None:
        """Resolve the target again: new addresses join (live), vanished ones leave (their
        sequences move on their next call, as after a failure)."""
        self._resolved_at = time.monotonic()
        addresses = expand(self.target)
        known = {r.address: r for r in self.replicas}
        for address in addresses:
            if address not in known:
                channel = self.security.channel(address, CHANNEL_OPTIONS)
                self.replicas.append(Replica(address, channel, self.make_stub(channel)))
        gone = [r for r in self.replicas if r.address not in addresses]
        for r in gone:
            self.replicas.remove(r)
            for seq_id in [s for s, a in self.pinned.items() if a == r.address]:
                del self.pinned[seq_id]
            if _loop_running():
                asyncio.ensure_future(r.channel.close())

    def _maybe_refresh(self) -> None:
        if "dns:///" in self.target and time.monotonic() - self._resolved_at > self.resolve_every_s:
            try:
                self.refresh()
            except OSError as exc:  # DNS trouble: keep the replicas we have
                log.warning("re-resolving %s failed: %s", self.target, exc)

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def route(self, seq_id: str) -> Replica | None:
        """The sequence's replica (pinned; a new or orphaned one by rendezvous over the live).
        A pinned id whose replica left (re-resolution) is routed anew and answered NOT_FOUND
        by the new replica, which makes the client resend its context."""
        by_address = {r.address: r for r in self.replicas}
        current = by_address.get(self.pinned.get(seq_id, ""))
        if current is not None and current.alive:
            return current
        live = self.live
        if not live:
            return None
        chosen = by_address[rendezvous(seq_id, [r.address for r in live])]
        self.pinned[seq_id] = chosen.address
        return chosen

    def _mark_down(self, replica: Replica, err: grpc.aio.AioRpcError) -> None:
        if replica.alive:
            log.warning("replica %s failed (%s: %s); moving its sequences", replica.address,
                        err.code().name, err.details())
            replica.alive, replica.down_since = False, time.monotonic()
            for seq_id in [s for s, a in self.pinned.items() if a == replica.address]:
                del self.pinned[seq_id]
            if self._probe is None or self._probe.done():
                self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        """Health-check the replicas that are out until each reports SERVING again."""
        while any(not r.alive for r in self.replicas):
            await asyncio.sleep(self.probe_interval_s)
            for r in [r for r in self.replicas if not r.alive]:
                try:
                    reply = await health_pb2_grpc.HealthStub(r.channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.aio.AioRpcError:
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    self.stalls.append(time.monotonic() - r.down_since)
                    r.alive, r.down_since = True, None
                    log.info("replica %s is back", r.address)

    # -- the stub calls --------------------------------------------------------------------------
    async def ProposeBatch(self, request, timeout=None):  # noqa: N802 - the stub's name
        return await self._batch("ProposeBatch", request, timeout)

    async def VerifyBatch(self, request, timeout=None):  # noqa: N802
        return await self._batch("VerifyBatch", request, timeout)

    async def GetModelInfo(self, request, timeout=None):  # noqa: N802
        """Any live replica's (they serve one model)."""
        last = None
        for r in self.live or self.replicas:
            try:
                return await r.stub.GetModelInfo(request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                last = err
                if err.code() not in _FAILOVER:
                    raise
                self._mark_down(r, err)
        raise last

    async def Release(self, request, timeout=None):  # noqa: N802
        groups: dict[str, list[str]] = {}
        for seq_id in request.sequence_ids:
            address = self.pinned.pop(seq_id, None)
            if address is not None:
                groups.setdefault(address, []).append(seq_id)
        by_address = {r.address: r for r in self.replicas}
        replies = await asyncio.gather(*(
            by_address[a].stub.Release(type(request)(sequence_ids=ids), timeout=timeout)
            for a, ids in groups.items() if a in by_address and by_address[a].alive),
            return_exceptions=True)
        released = sum(r.num_released for r in replies if not isinstance(r, BaseException))
        return _RELEASE_REPLIES[type(request)](num_released=released)

    async def _batch(self, method: str, request, timeout):
        """Split by replica, call concurrently, reassemble in order; a failed replica's items
        come back NOT_FOUND (moved: resend the context) or UNAVAILABLE when none is live."""
        self._maybe_refresh()
        groups: dict[str, list[int]] = {}
        routes = [self.route(req.header.sequence_id) for req in request.requests]
        for i, r in enumerate(routes):
            if r is not None:
                groups.setdefault(r.address, []).append(i)
        finished: dict[str, list[str]] = {}
        for seq_id in request.finished_sequence_ids:
            address = self.pinned.pop(seq_id, None)
            if address is not None:
                finished.setdefault(address, []).append(seq_id)
        by_address = {r.address: r for r in self.replicas}
        # one call per replica with work (finished ids of a replica that left or died: dropped)
        todo = sorted(set(groups) | {a for a in finished
                                     if a in by_address and by_address[a].alive})
        calls = {a: type(request)(requests=[request.requests[i] for i in groups.get(a, [])],
                                  finished_sequence_ids=finished.get(a, [])) for a in todo}
        replies = await asyncio.gather(*(by_address[a].batch_call(method)(
            calls[a], timeout=timeout) for a in todo), return_exceptions=True)
        reply_cls, result_cls = _REPLIES[method]
        results: list = [None] * len(request.requests)
        for address, reply in zip(todo, replies):
            replica = by_address[address]
            for k, i in enumerate(groups.get(address, [])):
                if isinstance(reply, grpc.aio.AioRpcError):
                    if reply.code() in _FAILOVER:
                        self._mark_down(replica, reply)
                        results[i] = _item_error(grpc.StatusCode.NOT_FOUND, f"replica {address} "
                                                 f"failed ({reply.code().name}); moved: resend")
                    else:
                        results[i] = _item_error(reply.code(), reply.details())
                elif isinstance(reply, BaseException):
                    raise reply
                else:
                    results[i] = reply.results[k]
                    replica.items_served += 1
        for i, res in enumerate(results):
            if res is None:  # no live replica at all
                results[i] = _item_error(grpc.StatusCode.UNAVAILABLE, "no live replica")
        return reply_cls(results=[result_cls(error=r) if isinstance(r, common_pb2.ItemError)
                                  else r for r in results])

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        for r in self.replicas:
            await r.channel.close()


_REPLIES = {"ProposeBatch": (draft_pb2.ProposeBatchResponse, draft_pb2.ProposeResult),
            "VerifyBatch": (verify_pb2.VerifyBatchResponse, verify_pb2.VerifyResult)}
_RELEASE_REPLIES = {draft_pb2.ReleaseRequest: draft_pb2.ReleaseResponse,
                    verify_pb2.VerifyReleaseRequest: verify_pb2.VerifyReleaseResponse}


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _item_error(code: grpc.StatusCode, message: str) -> common_pb2.ItemError:
    return common_pb2.ItemError(code=code.value[0], message=message)
