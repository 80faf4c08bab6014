"""GatewayClient: the client API over a gateway's GenerateService (one streaming call per
generation; the gateway runs the speculation)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from specmesh.clients.async_client import StreamEvent
from specmesh.clients.types import GenerationParams, GenerationResult, GenerationStats
from specmesh.v1 import generate_pb2, generate_pb2_grpc
from specmesh.wire.security import Security
from specmesh.wire.server import CHANNEL_OPTIONS

FINISH = {generate_pb2.FINISH_REASON_LENGTH: "length", generate_pb2.FINISH_REASON_EOS: "eos",
          generate_pb2.FINISH_REASON_STOP: "stop",
          generate_pb2.FINISH_REASON_CANCELLED: "cancelled"}


PRIORITY = {"interactive": generate_pb2.PRIORITY_INTERACTIVE,
            "batch": generate_pb2.PRIORITY_BATCH}


def generate_request(prompt: str | list[int], p: GenerationParams, model: str = ""
                     ) -> generate_pb2.GenerateRequest:
    """The request that asks the gateway for exactly `p` (every field set explicitly, so the
    gateway's own defaults never apply) from `model` ("" = the gateway's default)."""
    req = generate_pb2.GenerateRequest(
        max_new_tokens=p.max_new_tokens, sampling=p.sampling_proto(), stop=list(p.stop),
        speculate=p.speculate, ignore_eos=p.ignore_eos, adaptive=p.adaptive_on,
        tree_spec=p.tree.to_proto(), model=model, priority=PRIORITY[p.priority])
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    return req


class GatewayClient:
    def __init__(self, address: str, timeout_s: float = 600.0, security: Security | None = None,
                 model: str = ""):
        """`model`: what every request asks for ("name", "name@version"; "" = the default)."""
        self.address = address
        self.model = model
        self.security = security or Security()
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: generate_pb2_grpc.GenerateServiceStub | None = None

    async def connect(self) -> None:
        self._channel = self.security.channel(self.address, CHANNEL_OPTIONS)
        await self._channel.channel_ready()
        self._stub = generate_pb2_grpc.GenerateServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def stream(self, prompt: str | list[int], *, params: GenerationParams
                     ) -> AsyncIterator[StreamEvent]:
        """One StreamEvent per message; the last carries the GenerationResult."""
        start = time.perf_counter()
        ids: list[int] = []
        text = ""
        call = self._stub.Generate(generate_request(prompt, params, self.model),
                                   timeout=self.timeout_s)
        async for msg in call:
            ids += msg.token_ids
            text += msg.text
            if not msg.finish_reason:
                yield StreamEvent(list(msg.token_ids), msg.text)
                continue
            s = msg.stats
            stats = GenerationStats(
                num_rounds=s.num_rounds, num_draft_tokens=s.num_draft_tokens,
                num_accepted_tokens=s.num_accepted_tokens,
                num_generated_tokens=s.num_generated_tokens,
                time_to_first_token_s=s.time_to_first_token_s,
                total_time_s=time.perf_counter() - start, cache_hit=s.cache_hit)
            finish = FINISH.get(msg.finish_reason, "length")
            prompt_ids = [] if isinstance(prompt, str) else list(prompt)
            result = GenerationResult(text, ids, prompt_ids, finish, stats, str(params.tree)
                                      if params.speculate else "none", msg.matched_stop,
                                      msg.model, params.speculate and params.adaptive_on)
            yield StreamEvent(list(msg.token_ids), msg.text, finish, result)
