"""AsyncSpecMeshClient: generate() and stream() for many concurrent callers over one batch.

Each call becomes a request in the client's scheduler; one loop task runs the rounds for all of
them (clients/batch_loop.py) and hands each request its tokens as they are committed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc

from specmesh.clients.batch_loop import BatchLoop, PerRequestPolicy, RoundEvent
from specmesh.clients.detokenize import IncrementalText
from specmesh.clients.replicas import ReplicaSet
from specmesh.clients.result_cache import ResultCache
from specmesh.clients.scheduler import Scheduler, SchedulerConfig, SequenceRequest
from specmesh.clients.step import Stubs
from specmesh.clients.stops import first_stop, visible_text
from specmesh.clients.tokenizer import TextCodec
from specmesh.clients.types import GenerationParams, GenerationResult, GenerationStats
from specmesh.v1 import common_pb2, draft_pb2_grpc, verify_pb2_grpc
from specmesh.wire.errors import InvalidRequest, error_from_rpc
from specmesh.wire.security import Security
from specmesh.wire.server import CHANNEL_OPTIONS
from specmesh.wire.tree_spec import TreeSpec


@dataclass(frozen=True)
class StreamEvent:
    """One round's worth of new output (several tokens under speculation)."""

    token_ids: list[int]
    text: str  # the text these tokens add
    finish_reason: str | None = None
    result: GenerationResult | None = None  # set on the last event


MAX_PROMPT_BYTES_PER_TOKEN = 64  # a text prompt over 64 bytes x context is refused untokenized


class AsyncSpecMeshClient:
    def __init__(self, verify_addr: str, draft_addr: str | None = None,
                 tokenizer_dir: str | None = None, *, cache_addr: str | None = None,
                 scheduler: SchedulerConfig | None = None, retry_deadline_s: float = 30.0,
                 security: Security | None = None):
        """retry_deadline_s: how long a request keeps retrying (with capped exponential
        backoff) while the verify service is unreachable before it fails with UNAVAILABLE.
        security: TLS, bearer token and cache MAC key for every service it calls (default:
        from SPECMESH_* environment variables, else plaintext without a token)."""
        self.security = security or Security()
        self.verify_addr = verify_addr
        self.retry_deadline_s = retry_deadline_s
        self.draft_addr = draft_addr
        self.codec = TextCodec(tokenizer_dir) if tokenizer_dir else None
        self.results = ResultCache(cache_addr, security=self.security) if cache_addr else None
        self._scheduler_config = scheduler or SchedulerConfig()
        self._channels: list[grpc.aio.Channel] = []
        self._replica_sets: list[ReplicaSet] = []
        self.target_info: common_pb2.ModelInfo | None = None
        self.draft_info: common_pb2.ModelInfo | None = None
        self._loop: BatchLoop | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncSpecMeshClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def max_context(self) -> int:
        """Tokens a sequence may reach: the smaller context window of the two models."""
        sizes = [i.max_context for i in (self.target_info, self.draft_info) if i is not None]
        return min(sizes)

    async def connect(self) -> None:
        """Open the channels and read both models' info (the library's errors on failure:
        UNAUTHENTICATED without a valid token, UNAVAILABLE when a service is unreachable)."""
        try:
            await self._connect()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None

    def _stub(self, target: str, make_stub):
        """A stub for one address; a ReplicaSet (same calls, sequence affinity, failover) for
        several ('h1:p,h2:p') or a name that resolves to several ('dns:///name:port')."""
        if "," in target or target.startswith("dns:///"):
            replicas = ReplicaSet.connect(target, make_stub, self.security)
            self._replica_sets.append(replicas)
            return replicas
        channel = self.security.channel(target, CHANNEL_OPTIONS)
        self._channels.append(channel)
        return make_stub(channel)

    async def _connect(self) -> None:
        verify = self._stub(self.verify_addr, verify_pb2_grpc.VerifyServiceStub)
        self.target_info = await verify.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=30)
        draft = None
        if self.draft_addr:
            draft = self._stub(self.draft_addr, draft_pb2_grpc.DraftServiceStub)
            self.draft_info = await draft.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=30)
            # vocab 0: a model-free (n-gram) draft proposes the sequence's own tokens
            if self.draft_info.vocab_size not in (0, self.target_info.vocab_size):
                raise InvalidRequest("draft", f"draft vocab {self.draft_info.vocab_size} != "
                                     f"target vocab {self.target_info.vocab_size}")
        policy = PerRequestPolicy()
        stubs = Stubs(draft, verify, retry_deadline_s=self.retry_deadline_s)
        self._loop = BatchLoop(stubs, Scheduler(self._scheduler_config, policy), policy)
        self._task = asyncio.get_running_loop().create_task(self._loop.run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._loop is not None:
            self._loop.stubs.close()
        if self.results is not None:
            await self.results.close()
        for ch in self._channels:
            await ch.close()
        self._channels.clear()
        for replicas in self._replica_sets:
            await replicas.close()
        self._replica_sets.clear()

    # -- public API ------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], max_new_tokens: int | None = None, *,
                       params: GenerationParams | None = None, **kwargs) -> GenerationResult:
        """Generate to completion. kwargs override GenerationParams fields (temperature, top_p,
        top_k, seed, stop, ignore_eos, tree, speculate, adaptive)."""
        result = None
        async for event in self.stream(prompt, max_new_tokens, params=params, **kwargs):
            result = event.result or result
        return result

    async def stream(self, prompt: str | list[int], max_new_tokens: int | None = None, *,
                     params: GenerationParams | None = None,
                     **kwargs) -> AsyncIterator[StreamEvent]:
        """Yield new tokens as each round commits them; the last event carries the result.
        Closing the iterator early (or cancelling the task) cancels the generation."""
        p = _params(params, max_new_tokens, kwargs)
        prompt_ids = await self._encode(prompt)
        if len(prompt_ids) + 1 > self.target_info.max_context:
            raise InvalidRequest("prompt", f"{len(prompt_ids)} tokens leave no room in the "
                                 f"context of {self.target_info.max_context}")
        spec = p.tree if p.speculate and self.draft_info is not None else TreeSpec()
        gen = _Generation(self, prompt_ids, p, spec)
        cached = await self._cached(p, prompt_ids, spec)
        if cached is not None:
            async for ev in gen.replay(*cached):
                yield ev
            return
        async for ev in gen.run(self._loop):
            yield ev
        if self.results is not None and gen.result is not None:
            await self.results.store(p, prompt_ids, self._fp(self.draft_info),
                                     self.target_info.fingerprint, str(spec),
                                     gen.result.token_ids, gen.result.finish_reason)

    # -- helpers ---------------------------------------------------------------------------
    async def _cached(self, p: GenerationParams, prompt_ids: list[int], spec: TreeSpec):
        if self.results is None or not p.deterministic:
            return None
        hit = await self.results.lookup_result(p, prompt_ids, self._fp(self.draft_info),
                                               self.target_info.fingerprint, str(spec))
        return None if hit is None else (hit.token_ids, hit.finish_reason)

    @staticmethod
    def _fp(info) -> str:
        return info.fingerprint if info is not None else ""

    async def _encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; text is bounded (MAX_PROMPT_BYTES) and tokenized off the
        event loop, so one huge prompt never stalls the other generations."""
        limit = MAX_PROMPT_BYTES_PER_TOKEN * self.max_context
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "empty prompt")
            if self.codec is None:
                raise InvalidRequest("prompt", "text prompts need tokenizer_dir")
            size = len(prompt.encode("utf-8", "surrogatepass"))
            if size > limit:
                raise InvalidRequest("prompt", f"{size} bytes; at most {limit} "
                                     f"({MAX_PROMPT_BYTES_PER_TOKEN} per token of context)")
            return await asyncio.to_thread(self.codec.encode, prompt)
        if len(prompt) > self.max_context:
            raise InvalidRequest("prompt", f"{len(prompt)} tokens; the context holds "
                                 f"{self.max_context}")
        ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequest("prompt", "empty prompt")
        return ids

    def text(self, ids: list[int]) -> str:
        return self.codec.decode(ids) if self.codec else ""


class _Generation:
    """One request's life: queue into the scheduler, turn round events into stream events."""

    def __init__(self, client: AsyncSpecMeshClient, prompt_ids: list[int],
                 params: GenerationParams, spec: TreeSpec):
        self.client, self.prompt_ids, self.params, self.spec = client, prompt_ids, params, spec
        self.seq_id = uuid.uuid4().hex
        self.generated: list[int] = []
        self.decoded = IncrementalText(client.text, getattr(client.codec, "irregular_ids", ()))
        self.text = ""
        self.stats = GenerationStats()
        self.start = time.perf_counter()
        self.result: GenerationResult | None = None

    def _event(self, new: list[int], finish: str | None, matched: str = "") -> StreamEvent:
        self.generated += new
        text = visible_text(self.decoded.extend(new), self.params.stop,
                            finished=finish is not None)
        delta = text[len(self.text):] if text.startswith(self.text) else ""
        self.text = text if text.startswith(self.text) else self.text
        if finish is None:
            return StreamEvent(new, delta)
        self.stats.total_time_s = time.perf_counter() - self.start
        self.stats.num_generated_tokens = len(self.generated)
        self.result = GenerationResult(self.text, list(self.generated), self.prompt_ids, finish,
                                       self.stats, str(self.spec), matched,
                                       adaptive=self.spec.enabled and self.params.adaptive_on)
        return StreamEvent(new, delta, finish, self.result)

    async def replay(self, token_ids: list[int], finish: str) -> AsyncIterator[StreamEvent]:
        self.stats.cache_hit = True
        self.stats.time_to_first_token_s = time.perf_counter() - self.start
        yield self._event(list(token_ids), finish or "length")

    async def run(self, loop: BatchLoop) -> AsyncIterator[StreamEvent]:
        eos = self.client.target_info.eos_token_id
        # the context window ends a generation like max_new_tokens does (finish "length")
        room = self.client.max_context - len(self.prompt_ids)
        request = SequenceRequest(
            self.seq_id, tuple(self.prompt_ids), min(self.params.max_new_tokens, room),
            eos_token_id=eos if eos >= 0 else None, ignore_eos=self.params.ignore_eos,
            max_spec_tokens=self.spec.max_nodes, tree=self.spec,
            sampling=self.params.sampling_proto(), priority=self.params.priority)
        events = loop.submit(request, adaptive=self.params.adaptive_on)
        try:
            async for item in events:
                finish, matched = item.finish_reason, ""
                cut = first_stop(self._text_of, self.generated, item.tokens,
                                 self.params.stop)
                if cut is not None:  # keep exactly what one token per round would keep
                    item = replace(item, tokens=item.tokens[:cut[0]])
                    finish, matched = "stop", cut[1]
                    loop.cancel(self.seq_id, "stop")
                self._account(item)
                yield self._event(list(item.tokens), finish, matched)
                if finish is not None:
                    return
        finally:
            await events.aclose()

    def _text_of(self, ids: list[int]) -> str:
        """decode(ids) for ids extending this generation's, without decoding it all again."""
        return self.decoded.peek(ids[len(self.decoded.ids):])

    def _account(self, ev: RoundEvent) -> None:
        s = self.stats
        if s.num_generated_tokens == 0 and ev.tokens:
            s.time_to_first_token_s = time.perf_counter() - self.start
        if s.num_rounds == 0:
            s.queue_time_s = ev.queue_s
        s.num_rounds += 1
        s.num_draft_tokens += ev.num_drafted
        s.num_accepted_tokens += ev.num_accepted
        s.accepted_per_round.append(ev.num_accepted)
        s.num_generated_tokens += len(ev.tokens)


def _params(params: GenerationParams | None, max_new_tokens: int | None,
            kwargs: dict) -> GenerationParams:
    p = params or GenerationParams()
    if isinstance(kwargs.get("tree"), str):
        kwargs["tree"] = TreeSpec.parse(kwargs["tree"])
    if "stop" in kwargs:
        kwargs["stop"] = tuple(kwargs["stop"] or ())
    if max_new_tokens is not None:  # else params' own (GenerationParams' default: 128)
        kwargs["max_new_tokens"] = max_new_tokens
    return replace(p, **kwargs) if kwargs else p  # a new GenerationParams validates itself
