"""ResultCache: the finished output of deterministic requests, through the cache service.

    results = ResultCache(cache_addr)
    ids = await results.lookup(params, prompt_ids, draft_fp, target_fp, str(params.tree))
    if ids is None:
        ... generate ...
        await results.store(params, prompt_ids, draft_fp, target_fp, str(params.tree),
                            result.token_ids, result.finish_reason)

Only deterministic requests are cached: greedy, or sampling with a seed. The key holds every
field that decides the output (see `key`):
- greedy: the target's fingerprint, the prompt, max_new_tokens, stop strings and ignore_eos.
  Greedy speculative output is the target's own, token for token, so the draft, the tree and
  the unused sampling fields (top_p, top_k, seed) are left out: one entry serves every
  speculation setting.
- seeded sampling: also temperature, top_p, top_k, the seed, the draft's fingerprint and the
  tree (the sampled path depends on what the draft proposed). An adaptive tree is chosen from
  timings, so seeded sampling with `adaptive` is not cached.
Cancelled generations are never stored. Cache trouble is a miss (`CacheClient` never raises).
"""

from __future__ import annotations

from collections.abc import Sequence

from specmesh.clients.types import GenerationParams
from specmesh.v1 import cache_pb2, common_pb2
from specmesh.wire.cache_client import CacheClient, CacheClientStats, CachedResult, result_key
from specmesh.wire.security import Security

NOT_STORED = frozenset({"cancelled"})  # finish reasons of partial outputs


class ResultCache:
    """Looks up and stores generated token ids by request key (async; use in an event loop)."""

    def __init__(self, cache_addr: str, *, timeout_s: float = 0.5,
                 security: Security | None = None):
        self.client = CacheClient(cache_addr, timeout_s=timeout_s, security=security)

    @property
    def stats(self) -> CacheClientStats:
        """hits, misses, errors, skipped (not deterministic, or backing off after an error)."""
        return self.client.stats

    @staticmethod
    def key(params: GenerationParams, prompt_ids: Sequence[int], draft_fp: str, target_fp: str,
            tree_str: str) -> cache_pb2.ResultKey | None:
        """The result key of a request; None when its output is not deterministic."""
        greedy = params.temperature == 0
        if not greedy and (params.seed is None or (params.speculate and params.adaptive_on)):
            return None
        if greedy:
            sampling = common_pb2.SamplingParams(temperature=0.0)
            draft_fp, extra = "", ""
        else:
            sampling = params.sampling_proto()
            draft_fp, extra = (draft_fp, f"tree={tree_str}") if params.speculate else ("", "")
        return result_key(target_fingerprint=target_fp, prompt_token_ids=prompt_ids,
                          sampling=sampling, max_new_tokens=params.max_new_tokens,
                          draft_fingerprint=draft_fp, stop=params.stop,
                          ignore_eos=params.ignore_eos, extra=extra)

    async def lookup(self, params: GenerationParams, prompt_ids: Sequence[int], draft_fp: str,
                     target_fp: str, tree_str: str) -> list[int] | None:
        """The generated ids cached for this request, or None (miss, or not deterministic)."""
        hit = await self.lookup_result(params, prompt_ids, draft_fp, target_fp, tree_str)
        return hit.token_ids if hit is not None else None

    async def lookup_result(self, params: GenerationParams, prompt_ids: Sequence[int],
                            draft_fp: str, target_fp: str, tree_str: str) -> CachedResult | None:
        """Like `lookup`, with the finish reason the generation ended on."""
        key = self.key(params, prompt_ids, draft_fp, target_fp, tree_str)
        if key is None:
            self.client.stats.skipped += 1
            return None
        return await self.client.get_result(key)

    async def store(self, params: GenerationParams, prompt_ids: Sequence[int], draft_fp: str,
                    target_fp: str, tree_str: str, token_ids: Sequence[int],
                    finish_reason: str) -> bool:
        """Cache a finished generation's ids. True if stored (False: not deterministic,
        cancelled, over the service's size cap, or cache trouble)."""
        key = self.key(params, prompt_ids, draft_fp, target_fp, tree_str)
        if key is None or finish_reason in NOT_STORED:
            self.client.stats.skipped += 1
            return False
        return await self.client.put_result(key, token_ids, finish_reason)

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> ResultCache:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
