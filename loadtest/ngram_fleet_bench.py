"""Model-free n-gram drafting with the fleet n-gram table off vs on, through local stacks.

    python -m specmesh.loadtest.ngram_fleet_bench [--target DIR] [--num-prompts 8]

For each mode a fresh LocalStack (target, a model-free draft service, cache service over an
embedded redis-server; with the table on, the draft runs `--ngram-fleet-key`) serves, one
request at a time, greedy:
1. pass 1: `num_prompts` story openings (`loadtest.prompts.OPEN`): what the fleet learns from
   (their finished sequences are published);
2. pass 2 (measured): related but different prompts, each opening behind a lead-in sentence,
   so neither the result cache (not used here) nor a sequence's own tokens hold the answer.
Reported per mode and pass: accepted draft tokens per round and tokens/s, and whether both
modes generated the same tokens (they must: verify decides).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import LocalStack
from specmesh.clients.models import resolve_pair
from specmesh.loadtest.prompts import OPEN
from specmesh.wire.cache_client import CacheClient

LEAD_IN = "It was a sunny morning. "


def prompt_passes(num_prompts: int) -> tuple[list[str], list[str]]:
    """(pass 1 prompts, pass 2 prompts): openings, then the same openings behind a lead-in."""
    first = [OPEN[i % len(OPEN)] for i in range(num_prompts)]
    return first, [LEAD_IN + p for p in first]


async def run_pass(client: AsyncSpecMeshClient, prompts: list[str], max_new_tokens: int,
                   tree: str) -> dict:
    """Sequential greedy generations: accepted tokens per round, tokens/s, the token ids."""
    rounds = accepted = generated = 0
    ids = []
    start = time.perf_counter()
    for prompt in prompts:
        out = await client.generate(prompt, max_new_tokens, ignore_eos=True, tree=tree)
        rounds += out.stats.num_rounds
        accepted += out.stats.num_accepted_tokens
        generated += len(out.token_ids)
        ids.append(list(out.token_ids))
    elapsed = time.perf_counter() - start
    return {"accepted_per_round": accepted / max(rounds, 1), "rounds": rounds,
            "tokens_per_s": generated / elapsed, "seconds": elapsed, "ids": ids}


async def wait_for_publishes(cache_addr: str, settle_s: float = 0.3,
                             timeout_s: float = 20.0) -> int:
    """Poll the cache's Stats until ngrams_written stops growing; its final value."""
    async with CacheClient(cache_addr, timeout_s=5) as cache:
        last, since, deadline = -1, time.monotonic(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stats = await cache.server_stats()
            written = stats.ngrams_written if stats is not None else 0
            if written != last:
                last, since = written, time.monotonic()
            elif written > 0 and time.monotonic() - since >= settle_s:
                break
            await asyncio.sleep(0.05)
        return last


async def run_mode(args, target, fleet: bool) -> dict:
    extra = ["--ngram-fleet-key", f"bench:{target.name}"] if fleet else []
    first, second = prompt_passes(args.num_prompts)
    async with LocalStack(target, None, draft_method="ngram", cache=True,
                          redis_url=args.redis_url, extra_draft_args=extra,
                          quiet=True) as stack:
        if stack.cache_addr is None:
            raise SystemExit("needs redis-server on PATH (or --redis-url)")
        async with AsyncSpecMeshClient(stack.verify_addr, stack.draft_addr, str(target)) as c:
            await c.generate("Hi", 4, tree=args.tree)  # warm-up
            pass1 = await run_pass(c, first, args.max_new_tokens, args.tree)
            await c.generate("Hi", 1, tree=args.tree)  # carries the last release
            written = await wait_for_publishes(stack.cache_addr) if fleet else 0
            pass2 = await run_pass(c, second, args.max_new_tokens, args.tree)
    return {"fleet": fleet, "ngrams_written": written, "pass1": pass1, "pass2": pass2}


async def main_async(args) -> dict:
    target, _ = resolve_pair(args.target, "ngram")
    off = await run_mode(args, target, fleet=False)
    on = await run_mode(args, target, fleet=True)
    same = off["pass2"]["ids"] == on["pass2"]["ids"] and off["pass1"]["ids"] == on["pass1"]["ids"]
    for mode in (off, on):
        for p in ("pass1", "pass2"):
            mode[p].pop("ids")
    return {"target": target.name, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "tree": args.tree, "same_tokens": same,
            "off": off, "on": on}


def report(res: dict) -> str:
    lines = [f"{res['target']}, model-free drafting {res['tree']}, greedy, {res['num_prompts']} "
             f"prompts x {res['max_new_tokens']} tokens per pass, one at a time",
             f"{'fleet table':12} {'pass':>5} {'acc/round':>10} {'tok/s':>8} {'rounds':>7}"]
    for mode in ("off", "on"):
        for p in ("pass1", "pass2"):
            r = res[mode][p]
            lines.append(f"{mode:12} {p[-1]:>5} {r['accepted_per_round']:10.3f} "
                         f"{r['tokens_per_s']:8.1f} {r['rounds']:7d}")
    off, on = res["off"]["pass2"], res["on"]["pass2"]
    lines.append(f"pass 2, on vs off: {on['tokens_per_s'] / off['tokens_per_s']:.2f}x tokens/s, "
                 f"{on['accepted_per_round'] / max(off['accepted_per_round'], 1e-9):.2f}x "
                 f"accepted/round (n-grams counted: {res['on']['ngrams_written']}; "
                 f"same tokens: {res['same_tokens']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specmesh.loadtest.ngram_fleet_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target model folder (default: stand-in)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tree", default="ngram:8")
    p.add_argument("--redis-url", default=None, help="default: an embedded redis-server")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    res = asyncio.run(main_async(args))
    print(json.dumps(res, indent=1) if args.json else report(res))


if __name__ == "__main__":
    main()
