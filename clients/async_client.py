"""AsyncSpecMeshClient: generate() and stream() over a draft and a verify service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc

from clients.sequence import SequenceState
from clients.step import Stubs, run_round
from clients.tokenizer import TextCodec
from clients.types import GenerationParams, GenerationResult, GenerationStats
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from specmesh.wire.errors import InvalidRequest, error_from_rpc
from specmesh.wire.server import CHANNEL_OPTIONS
from specmesh.wire.tree_spec import TreeSpec


@dataclass(frozen=True)
class StreamEvent:
    """One round's worth of new output (tokens may be several under speculation)."""

    token_ids: list[int]
    text: str  # the text these tokens add
    finish_reason: str | None = None
    result: GenerationResult | None = None  # set on the last event


class AsyncSpecMeshClient:
    def __init__(self, verify_addr: str, draft_addr: str | None = None,
                 tokenizer_dir: str | None = None):
        self.verify_addr = verify_addr
        self.draft_addr = draft_addr
        self.codec = TextCodec(tokenizer_dir) if tokenizer_dir else None
        self._channels: list[grpc.aio.Channel] = []
        self.stubs: Stubs | None = None
        self.target_info: common_pb2.ModelInfo | None = None
        self._releases: set[asyncio.Task] = set()

    async def __aenter__(self) -> "AsyncSpecMeshClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        verify_ch = grpc.aio.insecure_channel(self.verify_addr, options=CHANNEL_OPTIONS)
        self._channels.append(verify_ch)
        verify = verify_pb2_grpc.VerifyServiceStub(verify_ch)
        draft = None
        self.target_info = await verify.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=30)
        if self.draft_addr:
            draft_ch = grpc.aio.insecure_channel(self.draft_addr, options=CHANNEL_OPTIONS)
            self._channels.append(draft_ch)
            draft = draft_pb2_grpc.DraftServiceStub(draft_ch)
            info = await draft.GetModelInfo(common_pb2.ModelInfoRequest(), timeout=30)
            if info.vocab_size != self.target_info.vocab_size:
                raise InvalidRequest("draft", f"draft vocab {info.vocab_size} != target vocab "
                                     f"{self.target_info.vocab_size}")
        self.stubs = Stubs(draft, verify)

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        for ch in self._channels:
            await ch.close()
        self._channels.clear()

    # -- public API ------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], max_new_tokens: int = 128, *,
                       params: GenerationParams | None = None, **kwargs) -> GenerationResult:
        """Generate to completion. kwargs override fields of GenerationParams
        (temperature, top_p, top_k, seed, stop, ignore_eos, tree, speculate, adaptive)."""
        result = None
        async for event in self.stream(prompt, max_new_tokens, params=params, **kwargs):
            result = event.result or result
        return result

    async def stream(self, prompt: str | list[int], max_new_tokens: int = 128, *,
                     params: GenerationParams | None = None,
                     **kwargs) -> AsyncIterator[StreamEvent]:
        """Yield new tokens as each round commits them; the last event carries the result."""
        p = _params(params, max_new_tokens, kwargs)
        prompt_ids = self._encode(prompt)
        seq = SequenceState(prompt_ids)
        stats = GenerationStats()
        start = time.perf_counter()
        spec = p.tree if p.speculate else TreeSpec()
        sampling = p.sampling_proto()
        finish = None
        text_so_far = ""
        try:
            while finish is None:
                out = await run_round(self.stubs, seq, spec, sampling)
                new, finish = self._cut(seq, out.tokens, p, len(prompt_ids))
                _account(stats, out, len(new), start)
                new_text = self._text(seq.generated)
                delta, text_so_far = new_text[len(text_so_far):], new_text
                if finish is None:
                    yield StreamEvent(new, delta)
            stats.total_time_s = time.perf_counter() - start
            result = GenerationResult(self._text(seq.generated), seq.generated, prompt_ids,
                                      finish, stats, str(spec))
            yield StreamEvent(new, delta, finish, result)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from err
        finally:
            self._release(seq.seq_id)

    # -- helpers ---------------------------------------------------------------------------
    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "empty prompt")
            if self.codec is None:
                raise InvalidRequest("prompt", "text prompts need tokenizer_dir")
            return self.codec.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequest("prompt", "empty prompt")
        return ids

    def _text(self, ids: list[int]) -> str:
        return self.codec.decode(ids) if self.codec else ""

    def _cut(self, seq: SequenceState, new: list[int], p: GenerationParams,
             prompt_len: int) -> tuple[list[int], str | None]:
        """Trim this round's tokens at EOS / max_new_tokens / stop string; say why we stop."""
        eos = self.target_info.eos_token_id
        base = len(seq.tokens) - len(new)
        for i, tok in enumerate(new):
            if not p.ignore_eos and tok == eos:
                del seq.tokens[base + i + 1:]
                return new[: i + 1], "eos"
            if base + i + 1 - prompt_len >= p.max_new_tokens:
                del seq.tokens[base + i + 1:]
                return new[: i + 1], "length"
        if p.stop and self.codec:
            text = self._text(seq.generated)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                return new, "stop"
        return new, None

    def _release(self, seq_id: str) -> None:
        async def release():
            reqs = [self.stubs.verify.Release(
                verify_pb2.VerifyReleaseRequest(sequence_ids=[seq_id]), timeout=5)]
            if self.stubs.draft is not None:
                reqs.append(self.stubs.draft.Release(
                    draft_pb2.ReleaseRequest(sequence_ids=[seq_id]), timeout=5))
            await asyncio.gather(*reqs, return_exceptions=True)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


def _params(params: GenerationParams | None, max_new_tokens: int, kwargs: dict) -> GenerationParams:
    p = params or GenerationParams()
    if isinstance(kwargs.get("tree"), str):
        kwargs["tree"] = TreeSpec.parse(kwargs["tree"])
    if "stop" in kwargs:
        kwargs["stop"] = tuple(kwargs["stop"] or ())
    p = replace(p, max_new_tokens=max_new_tokens, **kwargs)
    try:
        p.validate()
        p.tree.validate("tree")
    except ValueError as exc:
        field, _, problem = str(exc).partition(": ")
        raise InvalidRequest(field, problem) from exc
    return p


def _account(stats: GenerationStats, out, num_new: int, start: float) -> None:
    if stats.num_generated_tokens == 0 and num_new:
        stats.time_to_first_token_s = time.perf_counter() - start
    stats.num_rounds += 1
    stats.num_draft_tokens += out.num_drafted
    stats.num_accepted_tokens += out.num_accepted
    stats.accepted_per_round.append(out.num_accepted)
    stats.num_generated_tokens += num_new
