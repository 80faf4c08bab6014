"""The gateway's connected models: a Registry (clients/registry.py) made live.

Entries that share their services, tokenizer and limits (`ModelEntry.connection`) share one
AsyncSpecMeshClient, and so one batch; each entry keeps its own defaults (tree, adaptive,
max_new_tokens). `reload()` (the gateway's SIGHUP) swaps in a re-read file: clients whose
connection is unchanged are kept, new ones are connected first (a bad file or an unreachable
service leaves the old table serving), and clients no longer named are closed once their
in-flight requests end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.chat_template import ChatTemplate
from specmesh.clients.registry import ModelEntry, Registry, Router
from specmesh.clients.types import GenerationParams
from specmesh.errors import InvalidRequest
from specmesh.wire.security import Security

log = logging.getLogger(__name__)


@dataclass
class _Live:
    """One connected client and the requests using it."""

    client: AsyncSpecMeshClient
    chat: ChatTemplate | None
    active: int = 0
    retired: bool = False


@dataclass(frozen=True)
class Route:
    """What one request runs on: its entry, the client, the entry's defaults and chat template."""

    entry: ModelEntry
    client: AsyncSpecMeshClient
    defaults: GenerationParams
    chat: ChatTemplate | None

    def check(self, params: GenerationParams) -> GenerationParams:
        """The entry's limits on a request (InvalidRequest naming the field)."""
        if params.max_new_tokens > self.entry.max_new_tokens:
            raise InvalidRequest("max_new_tokens", f"{params.max_new_tokens} is more than model "
                                 f"{self.entry.key!r} allows ({self.entry.max_new_tokens})")
        return params


def entry_defaults(entry: ModelEntry, base: GenerationParams | None = None) -> GenerationParams:
    """GenerationParams defaults of one entry: its tree, adaptive flag and token cap."""
    base = base or GenerationParams()
    return replace(base, tree=entry.tree, adaptive=entry.adaptive,
                   speculate=entry.draft is not None and entry.tree.enabled,
                   max_new_tokens=min(base.max_new_tokens, entry.max_new_tokens))


class ModelRouter:
    def __init__(self, registry: Registry, security: Security | None = None,
                 path: str | os.PathLike | None = None):
        """`path`: the registry file `reload()` re-reads (None: a fixed registry)."""
        self.security = security or Security()
        self.path = pathlib.Path(path) if path is not None else None
        self.registry = registry
        self._router = Router(registry)
        self._live: dict[tuple, _Live] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike, security: Security | None = None
                  ) -> "ModelRouter":
        return cls(Registry.load(path), security, path)

    async def start(self) -> None:
        """Connect every entry's client (the library's errors if a service is unreachable)."""
        self._live = await self._connect(self.registry, {})

    async def _connect(self, registry: Registry, keep: dict[tuple, _Live]) -> dict[tuple, _Live]:
        live: dict[tuple, _Live] = {}
        try:
            for e in registry.entries:
                conn = e.connection()
                if conn in live:
                    continue
                if conn in keep:
                    live[conn] = keep[conn]
                    continue
                client = AsyncSpecMeshClient(e.verify, e.draft, e.tokenizer, cache_addr=e.cache,
                                             scheduler=e.scheduler, security=self.security)
                live[conn] = _Live(client, None)
                await client.connect()
                live[conn].chat = ChatTemplate.from_model_dir(e.tokenizer) if e.tokenizer \
                    else None
        except BaseException:
            for conn, item in live.items():
                if conn not in keep:
                    await item.client.close()
            raise
        return live

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        return self.registry.entries

    def client_of(self, entry: ModelEntry) -> AsyncSpecMeshClient:
        return self._live[entry.connection()].client

    @contextlib.asynccontextmanager
    async def use(self, model: str) -> AsyncIterator[Route]:
        """The route for a request's `model` (UnknownModel, NOT_FOUND, if none), held for the
        request's life so a reload never closes a client under it."""
        entry = self._router.resolve(model)
        live = self._live[entry.connection()]
        live.active += 1
        try:
            yield Route(entry, live.client, entry_defaults(entry), live.chat)
        finally:
            live.active -= 1
            if live.retired and live.active == 0:
                await live.client.close()

    async def reload(self) -> Registry:
        """Re-read the file and swap the table (the old one keeps serving on any error)."""
        if self.path is None:
            raise ValueError("this router was not built from a file")
        registry = Registry.load(self.path)
        live = await self._connect(registry, self._live)
        old, self._live = self._live, live
        self.registry, self._router = registry, Router(registry)
        for conn, item in old.items():
            if conn not in live:
                item.retired = True
                if item.active == 0:
                    await item.client.close()
        log.info("models reloaded from %s: %s", self.path, ", ".join(registry.keys()))
        return registry

    async def close(self) -> None:
        for item in self._live.values():
            await item.client.close()
        self._live.clear()
