"""The fleet n-gram table on the draft side: continuations seen in other requests (any draft
service of the fleet), shared through the cache service's PutNgrams/GetNgrams, merged into
n-gram drafting's trie beside the sequence's own matches.

No Redis round trip on the token path. Per round, `continuations()` reads a local bounded LRU of
fetched contexts (dict lookups) and queues the contexts it lacks; one background task fetches
them (at most `fetch_batch` per GetNgrams, newest first) for the next rounds. A context fetched
j tokens ago still serves: its continuations that agree with the j tokens since are used from
there on. A new prompt's end contexts are fetched at admission, waited for at most
`admission_wait_s`. Finished sequences (and every `publish_every` new tokens of long ones) are
published by background tasks: the generated tokens' continuations after the contexts before
them. Cache trouble is a miss (the client backs off), never an error.

    fleet = FleetTable(CacheClient(addr), key=target_fingerprint)
    extra = fleet.continuations(seq_id, history)   # [(weight, tokens)] for propose_tree
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from specmesh.wire.cache_client import CacheClient

log = logging.getLogger(__name__)
Continuations = list[tuple[tuple[int, ...], int]]  # (tokens, count), most counted first
MAX_PUT_NGRAMS = 8192  # the cache service's cap per PutNgrams (positions x context lengths)
VALID_TOKEN = 1 << 30  # ids the draft service accepts


@dataclass(frozen=True)
class FleetConfig:
    min_n: int = 2
    """Shortest context published and looked up (a single token says little across requests)."""
    max_n: int = 4
    """Longest context."""
    max_depth: int = 8
    """Tokens per published continuation."""
    weight: float = 0.5
    """Trie weight per context token per log2(1 + count): a continuation seen by 3 requests
    after a 4-token context weighs 4, one local match of that context; local evidence (which
    also sums over the shorter contexts down to 1 token) usually dominates."""
    lookback: int = 8
    """Fetched contexts ending up to this many tokens back still serve (via their
    continuations that agree with the tokens since)."""
    max_continuations: int = 8
    """Continuations fetched per context."""
    max_contexts: int = 1 << 16
    """Local LRU of fetched contexts (empty ones included)."""
    entry_ttl_s: float = 30.0
    """A fetched context is fetched again after this long (others keep publishing)."""
    miss_ttl_s: float = 5.0
    """A context fetched with no continuation is fetched again after this long. (Contexts
    this service publishes are dropped from the LRU at once.)"""
    fetch_batch: int = 256
    """Contexts per GetNgrams call."""
    max_pending: int = 4096
    """Contexts queued for fetching; the oldest are dropped beyond this."""
    fetch_timeout_s: float = 0.5
    """Deadline of one GetNgrams / PutNgrams call."""
    admission_wait_s: float = 0.005
    """How long a new sequence's first proposal waits for its prompt's end contexts."""
    publish_every: int = 256
    """Publish a running sequence every this many new tokens (and at its end)."""
    max_sequences: int = 8192
    """Sequences whose publish position is tracked."""

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n <= 8 or not 1 <= self.max_depth <= 16:
            raise ValueError("need 1 <= min_n <= max_n <= 8 and 1 <= max_depth <= 16")


@dataclass
class FleetStats:
    fetches: int = 0  # GetNgrams calls
    contexts_fetched: int = 0
    contexts_hit: int = 0  # fetched with at least one continuation
    proposals_helped: int = 0  # continuations() calls that returned fleet evidence
    published: int = 0  # (context, continuation) pairs the cache counted
    fetch_s: float = 0.0  # time spent in GetNgrams calls (in the background)


def fleet_continuations(history: np.ndarray, known: Mapping[tuple[int, ...], Continuations],
                        config: FleetConfig) -> list[tuple[float, tuple[int, ...]]]:
    """(weight, continuation of the sequence's end) from the fetched contexts. history: [L].

    For each context length n (longest first), the nearest context in `known` (ending j tokens
    back, j < lookback) with a continuation that agrees with the j tokens since serves; its
    continuations are cut to what follows the end. Weight: n * weight * log2(1 + count)."""
    length = len(history)
    tail = [int(t) for t in history[max(0, length - config.max_n - config.lookback):]]
    end = len(tail)  # tail[end - j - n:end - j] is the context ending j tokens back
    out: list[tuple[float, tuple[int, ...]]] = []
    for n in range(config.max_n, config.min_n - 1, -1):
        for j in range(min(config.lookback, end - n + 1)):
            entry = known.get(tuple(tail[end - j - n:end - j]))
            since = tuple(tail[end - j:])  # [j] tokens after the context
            found = [(n * config.weight * math.log2(1 + count), cont[j:])
                     for cont, count in entry or () if len(cont) > j and cont[:j] == since]
            if found:
                out.extend(found)
                break
    return out


def end_contexts(history: Sequence[int], config: FleetConfig, lookback: int = 1
                 ) -> list[tuple[int, ...]]:
    """The contexts ending at the last `lookback` positions of `history`, newest first."""
    tail = [int(t) for t in history[max(0, len(history) - config.max_n - lookback + 1):]]
    end = len(tail)
    return [tuple(tail[end - j - n:end - j]) for j in range(lookback)
            for n in range(config.max_n, config.min_n - 1, -1) if end - j - n >= 0]


def publish_pieces(first: int, end: int, config: FleetConfig) -> list[tuple[int, int, int]]:
    """(slice start, first position, end position) of the PutNgrams calls that publish the
    continuations starting at [first, end) of a sequence: each call sends the tokens from its
    slice start through its end position + max_depth, within the cache's per-call cap."""
    per_call = MAX_PUT_NGRAMS // (config.max_n - config.min_n + 1)
    pieces = []
    for start in range(first, end, per_call):
        stop = min(start + per_call, end)
        lo = max(0, start - config.max_n)
        pieces.append((lo, start - lo, stop - lo))
    return pieces


class FleetTable:
    """The draft service's view of the fleet table under one table key (the target model)."""

    def __init__(self, client: CacheClient, key: str, config: FleetConfig = FleetConfig(),
                 clock: Callable[[], float] = time.monotonic):
        if not key:
            raise ValueError("the fleet table needs a key (the target model's fingerprint)")
        self.client, self.key, self.config = client, key, config
        self.stats = FleetStats()
        self._clock = clock
        self._known: OrderedDict[tuple[int, ...], tuple[float, Continuations]] = OrderedDict()
        self._wanted: OrderedDict[tuple[int, ...], None] = OrderedDict()  # oldest first
        self._in_flight: set[tuple[int, ...]] = set()
        self._published: OrderedDict[str, int] = OrderedDict()  # seq -> next start to publish
        self._fetcher: asyncio.Task | None = None
        self._arrived = asyncio.Condition()
        self._tasks: set[asyncio.Task] = set()  # publishes in flight

    # -- the token path (no I/O) ----------------------------------------------------------------
    def continuations(self, seq_id: str, history: np.ndarray
                      ) -> list[tuple[float, tuple[int, ...]]]:
        """Fleet evidence for the end of `history` [L] from what was fetched; queues the end
        contexts not fetched yet and publishes every `publish_every` new tokens."""
        self._track(seq_id, history)
        known = _Fresh(self._known, self._clock())
        found = fleet_continuations(history, known, self.config)
        missing = [ctx for ctx in end_contexts(history, self.config, self.config.lookback)
                   if ctx not in known]
        self._want(missing)
        if found:
            self.stats.proposals_helped += 1
        return found

    def finish(self, seq_id: str, history: np.ndarray | None) -> None:
        """The sequence ended (or was released): publish what it has not published yet."""
        start = self._published.pop(seq_id, None)
        if history is not None and start is not None and start < len(history):
            self._publish(history, start, len(history))

    # -- admission ------------------------------------------------------------------------------
    async def admit(self, tokens: Sequence[int]) -> None:
        """A new sequence: fetch its prompt's end contexts, waiting at most admission_wait_s."""
        contexts = end_contexts(tokens, self.config)
        if not contexts or not all(0 <= t < VALID_TOKEN for t in contexts[0]):
            return  # bad ids: the proposal's own checks answer them
        self._want([ctx for ctx in contexts if ctx not in _Fresh(self._known, self._clock())])
        if self.config.admission_wait_s <= 0:
            return

        def ready() -> bool:
            return not any(ctx in self._wanted or ctx in self._in_flight for ctx in contexts)

        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(ready),
                                       self.config.admission_wait_s)
            except asyncio.TimeoutError:
                pass

    # -- background work ------------------------------------------------------------------------
    def _want(self, contexts: list[tuple[int, ...]]) -> None:
        """Queue `contexts` (newest position first) for the fetcher, which takes the last
        queued first."""
        for ctx in reversed(contexts):
            if ctx not in self._in_flight:
                self._wanted[ctx] = None
                self._wanted.move_to_end(ctx)
        while len(self._wanted) > self.config.max_pending:
            self._wanted.popitem(last=False)
        if self._wanted and (self._fetcher is None or self._fetcher.done()):
            try:
                self._fetcher = asyncio.get_running_loop().create_task(self._fetch_loop())
            except RuntimeError:  # no event loop (a plain function call): nothing to fetch with
                pass

    async def _fetch_loop(self) -> None:
        """Fetch wanted contexts, newest first, until none are left (or the cache fails)."""
        while self._wanted:
            batch = [self._wanted.popitem()[0]
                     for _ in range(min(self.config.fetch_batch, len(self._wanted)))]
            self._in_flight.update(batch)
            start = self._clock()
            try:
                found = await self.client.get_ngrams(self.key, batch,
                                                     self.config.max_continuations,
                                                     timeout_s=self.config.fetch_timeout_s)
            finally:
                self._in_flight.difference_update(batch)
            self.stats.fetches += 1
            self.stats.fetch_s += self._clock() - start
            if found is not None:
                self._remember(batch, found)
            async with self._arrived:
                self._arrived.notify_all()
            if found is None:  # cache trouble (the client backs off): try again when asked
                self._wanted.clear()
                return

    def _remember(self, batch: list[tuple[int, ...]], found: list[Continuations]) -> None:
        now = self._clock()
        for ctx, entry in zip(batch, found):
            ttl = self.config.entry_ttl_s if entry else self.config.miss_ttl_s
            self._known[ctx] = (now + ttl, entry)
            self._known.move_to_end(ctx)
            self.stats.contexts_hit += bool(entry)
        self.stats.contexts_fetched += len(batch)
        while len(self._known) > self.config.max_contexts:
            self._known.popitem(last=False)

    def _track(self, seq_id: str, history: np.ndarray) -> None:
        """Remember where the sequence's generated tokens start; publish long runs."""
        # first seen: its prompt is not published (only what is generated after it is)
        start = min(self._published.get(seq_id, len(history)), len(history))
        self._published[seq_id] = start
        self._published.move_to_end(seq_id)
        while len(self._published) > self.config.max_sequences:
            self._published.popitem(last=False)
        ready = len(history) - self.config.max_depth  # continuations complete up to here
        if ready - start >= self.config.publish_every:
            self._publish(history, start, ready)
            self._published[seq_id] = ready

    def _publish(self, history: np.ndarray, first: int, end: int) -> None:
        """Count continuations starting at [first, end) in the background; the contexts they
        follow are dropped from the LRU (their fetched entries are stale now)."""
        offset = max(0, first - self.config.max_n)
        tokens = [int(t) for t in history[offset:min(len(history), end + self.config.max_depth)]]
        for pos in range(first - offset, end - offset):
            for n in range(self.config.min_n, min(self.config.max_n, pos) + 1):
                self._known.pop(tuple(tokens[pos - n:pos]), None)
        try:
            task = asyncio.get_running_loop().create_task(
                self._put(tokens, first - offset, end - offset))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, tokens: list[int], first: int, end: int) -> None:
        c = self.config
        for lo, start, stop in publish_pieces(first, end, c):
            self.stats.published += await self.client.put_ngrams(
                self.key, tokens[lo:lo + stop + c.max_depth], first=start, end=stop, min_n=c.min_n,
                max_n=c.max_n, max_depth=c.max_depth, timeout_s=c.fetch_timeout_s)

    async def close(self, drain_s: float = 1.0) -> None:
        """Let publishes in flight finish (at most `drain_s`), stop fetching, close the client."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=drain_s)
        for task in (*self._tasks, self._fetcher):
            if task is not None and not task.done():
                task.cancel()
        await self.client.close()


class _Fresh(Mapping):
    """The entries of the LRU not yet expired, as a read-only mapping (touches on read)."""

    def __init__(self, known: OrderedDict, now: float):
        self._known, self._now = known, now

    def __getitem__(self, ctx):
        expires, entry = self._known[ctx]
        if expires < self._now:
            raise KeyError(ctx)
        self._known.move_to_end(ctx)
        return entry

    def __contains__(self, ctx) -> bool:
        try:
            self[ctx]
        except KeyError:
            return False
        return True

    def __iter__(self):
        return iter(self._known)

    def __len__(self) -> int:
        return len(self._known)


def ngram_options(config) -> dict:
    """The draft servicer's n-gram drafter from a ModelServiceConfig: with the fleet table when
    `ngram_fleet_key` is set (through the cache service at `cache_addr`)."""
    from specmesh.draft_service.ngram_engine import NgramDrafter  # it imports this module

    if not config.ngram_fleet_key:
        return {}
    client = CacheClient(config.cache_addr, timeout_s=FleetConfig.fetch_timeout_s,
                         security=config.security)
    return {"ngram": NgramDrafter(fleet=FleetTable(client, config.ngram_fleet_key))}
