"""Prefix-KV cache on vs off, and result-cache hit vs a fresh generation, through local stacks.

    python -m specmesh.loadtest.prefix_cache_bench [--target DIR] [--draft DIR] [--reps 3]

Two LocalStacks of the pair (default: the stand-in pair) run side by side: cache off, and cache
on (embedded redis-server + cache service). Each serves, one request at a time:
1. a warm-up request (unrelated short prompt);
2. a "seed" request whose prompt is the shared prefix + its own suffix (with the cache on, its
   chunks are stored in the background; we wait until they are);
3. `reps` measured requests, alternating off, on: the shared prefix (320 tokens) + a fresh
   suffix (to 384 tokens), so each finds only the shared prefix cached, like a new turn on a
   common system prompt. After each, we wait for the background stores to finish.
Greedy, `max_new_tokens` new tokens, speculative (`--tree`). Reported: time to first token and
total time (median of the reps), and whether both modes gave the same tokens. Then, on the
cache-on stack: a result-cache hit (`clients.result_cache.ResultCache.lookup`) against a fresh
generation of the same request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time

import numpy as np

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import LocalStack
from specmesh.clients.models import resolve_pair
from specmesh.clients.result_cache import ResultCache
from specmesh.clients.types import GenerationParams
from specmesh.wire.cache_client import CacheClient
from specmesh.wire.tree_spec import TreeSpec

CHUNK = 16  # the services' default --prefix-chunk-size


def make_prompts(vocab: int, prefix_tokens: int, prompt_tokens: int, reps: int,
                 seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """(seed prompt, measured prompts): BOS + one shared prefix, each with its own suffix."""
    rng = np.random.default_rng(seed)
    prefix = [1] + rng.integers(3, vocab, prefix_tokens - 1).tolist()
    suffixes = [rng.integers(3, vocab, prompt_tokens - prefix_tokens).tolist()
                for _ in range(reps + 1)]
    return prefix + suffixes[0], [prefix + s for s in suffixes[1:]]


async def wait_for_chunks(cache_addr: str, expected: int, timeout_s: float = 30.0) -> int:
    """Poll the cache's Stats until `expected` chunks were written (the background stores)."""
    async with CacheClient(cache_addr, timeout_s=5) as cache:
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await cache.server_stats()
            written = stats.chunks_written if stats is not None else 0
            if written >= expected or time.monotonic() > deadline:
                return written
            await asyncio.sleep(0.05)


async def timed(client: AsyncSpecMeshClient, prompt: list[int],
                params: GenerationParams) -> tuple[float, float, list[int]]:
    """(time to first token, total time, generated ids) of one streamed request."""
    start = time.perf_counter()
    ttft, ids = None, []
    async for event in client.stream(prompt, params.max_new_tokens, params=params):
        if ttft is None and event.token_ids:
            ttft = time.perf_counter() - start
        ids.extend(event.token_ids)
    return ttft, time.perf_counter() - start, ids


async def result_cache_latency(args, client: AsyncSpecMeshClient, cache_addr: str,
                               prompt: list[int], params: GenerationParams) -> dict:
    """A fresh generation of `prompt` vs a result-cache hit for it (a greedy key ignores the
    draft, so no draft fingerprint is needed)."""
    target_fp = client.target_info.fingerprint
    tree = str(params.tree)
    async with ResultCache(cache_addr, timeout_s=5) as results:
        assert await results.lookup(params, prompt, "", target_fp, tree) is None
        _, fresh_s, ids = await timed(client, prompt, params)
        await results.store(params, prompt, "", target_fp, tree, ids, "length")
        hits = []
        for _ in range(args.result_lookups):
            start = time.perf_counter()
            got = await results.lookup(params, prompt, "", target_fp, tree)
            hits.append(time.perf_counter() - start)
            assert got == ids
    return {"fresh_generation_s": fresh_s, "hit_median_s": statistics.median(hits),
            "hit_max_s": max(hits), "lookups": len(hits)}


async def _server_stats(cache_addr: str):
    async with CacheClient(cache_addr, timeout_s=5) as cache:
        return await cache.server_stats()


def summary(mode: str, runs: list[tuple[float, float, list[int]]]) -> dict:
    return {"mode": mode,
            "ttft_s": statistics.median(r[0] for r in runs),
            "total_s": statistics.median(r[1] for r in runs),
            "ttft_all_s": [round(r[0], 4) for r in runs],
            "total_all_s": [round(r[1], 4) for r in runs]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specmesh.loadtest.prefix_cache_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target model folder (default: stand-in)")
    p.add_argument("--draft", default=None, help="draft model folder (default: stand-in)")
    p.add_argument("--prefix-tokens", type=int, default=320)
    p.add_argument("--prompt-tokens", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tree", default="chain:4")
    p.add_argument("--reps", type=int, default=5, help="measured requests per mode")
    p.add_argument("--result-lookups", type=int, default=20)
    p.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p


async def main_async(args) -> dict:
    """Both stacks up at once; the measured requests alternate off, on (same load for both)."""
    target, draft = resolve_pair(args.target, args.draft)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=True,
                              tree=TreeSpec.parse(args.tree))
    async with contextlib.AsyncExitStack() as stacks:
        off = await stacks.enter_async_context(LocalStack(target, draft))
        on = await stacks.enter_async_context(LocalStack(target, draft, cache=True,
                                                         redis_url=args.redis_url))
        if on.cache_addr is None:
            raise SystemExit("cache on needs redis-server on PATH (or --redis-url)")
        clients = [await stacks.enter_async_context(AsyncSpecMeshClient(s.verify_addr,
                                                                        s.draft_addr))
                   for s in (off, on)]
        seed_prompt, prompts = make_prompts(clients[0].target_info.vocab_size,
                                            args.prefix_tokens, args.prompt_tokens, args.reps)
        for client in clients:
            await client.generate([1, 5, 6, 7], 8, params=params)  # warm-up
            await client.generate(seed_prompt, args.max_new_tokens, params=params)
        # both models store every full chunk of each new prompt (in the background)
        chunks = 2 * (len(seed_prompt) // CHUNK)
        await wait_for_chunks(on.cache_addr, chunks)
        runs: tuple[list, list] = ([], [])
        for prompt in prompts:
            for client, out in zip(clients, runs):
                out.append(await timed(client, prompt, params))
            chunks += 2 * (len(prompt) // CHUNK - args.prefix_tokens // CHUNK)
            await wait_for_chunks(on.cache_addr, chunks)  # no background work in the next run
        hits = (await _server_stats(on.cache_addr)).prefix_hits
        result_cache = await result_cache_latency(args, clients[1], on.cache_addr, prompts[0],
                                                  params)
    return {"target": target.name, "draft": draft.name, "prompt_tokens": args.prompt_tokens,
            "shared_prefix_tokens": args.prefix_tokens, "max_new_tokens": args.max_new_tokens,
            "tree": args.tree, "reps": args.reps,
            "same_tokens": [r[2] for r in runs[0]] == [r[2] for r in runs[1]],
            "runs": [summary("cache off", runs[0]),
                     dict(summary("cache on", runs[1]), prefix_hits=hits,
                          result_cache=result_cache)]}


def report(res: dict) -> str:
    off, on = res["runs"]
    rc = on["result_cache"]
    lines = [
        f"{res['target']} + {res['draft']}, {res['prompt_tokens']}-token prompts sharing "
        f"{res['shared_prefix_tokens']} tokens with an earlier request, "
        f"{res['max_new_tokens']} new tokens, greedy {res['tree']}, median of {res['reps']}",
        f"{'':10} {'TTFT s':>8} {'total s':>8}",
        f"{'cache off':10} {off['ttft_s']:8.3f} {off['total_s']:8.3f}",
        f"{'cache on':10} {on['ttft_s']:8.3f} {on['total_s']:8.3f}",
        f"speed-up   {off['ttft_s'] / on['ttft_s']:7.2f}x {off['total_s'] / on['total_s']:7.2f}x"
        f"   (same tokens: {res['same_tokens']}, prefix hits: {on['prefix_hits']})",
        f"result cache: hit {1e3 * rc['hit_median_s']:.2f} ms median "
        f"(max {1e3 * rc['hit_max_s']:.2f} ms, {rc['lookups']} lookups) vs fresh generation "
        f"{rc['fresh_generation_s']:.3f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    res = asyncio.run(main_async(args))
    if not args.json:
        print(report(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
