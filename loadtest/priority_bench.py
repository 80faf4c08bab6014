"""Interactive latency under a batch flood: what the priority classes buy, through a local stack.

    python -m specmesh.loadtest.priority_bench [--target DIR] [--draft DIR] [--batch 32]
        [--batch-tokens 256] [--interactive 16] [--interactive-tokens 16] [--tree chain:4]
        [--kv-cache-mb MB] [--batch-round-tokens N] [--json]

One LocalStack of the pair (default: the stand-in pair). Interactive requests (short story
openings, `--interactive-tokens` each) are sent one at a time, first with nothing else running
(the baseline), then while `--batch` long batch requests (`--batch-tokens` each, EOS ignored)
run, and then again with the flood sent as interactive too (what first come, first served
gives). Reported per phase: interactive TTFT p50 / p95 and the ratio to the baseline's p95;
preemptions by class (a small `--kv-cache-mb` forces the verify service out of room); whether
every batch request finished; the flood's tokens/s. Greedy outputs are checked against the
baseline's (priority never changes output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import LocalStack
from specmesh.clients.models import resolve_pair
from specmesh.clients.priority import DEFAULT_BATCH, ClassLimits
from specmesh.clients.scheduler import SchedulerConfig
from specmesh.loadtest.prompts import OPEN
from specmesh.wire.tree_spec import TreeSpec


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


async def interactive_run(client: AsyncSpecMeshClient, args) -> tuple[list[float], list[list]]:
    """One request at a time; (TTFTs, outputs)."""
    ttfts, outs = [], []
    for i in range(args.interactive):
        r = await client.generate(OPEN[i % len(OPEN)], args.interactive_tokens,
                                  tree=args.tree, ignore_eos=True)
        ttfts.append(r.stats.time_to_first_token_s)
        outs.append(r.token_ids)
        if args.verbose:
            print(f"ttft {r.stats.time_to_first_token_s*1e3:.1f} ms queue "
                  f"{r.stats.queue_time_s*1e3:.1f} ms total {r.stats.total_time_s*1e3:.1f}")
        await asyncio.sleep(args.gap_s)
    return ttfts, outs


async def flood_phase(client: AsyncSpecMeshClient, args, priority: str) -> dict:
    """Interactive requests one at a time while the flood runs (sent as `priority`)."""
    sched = client._loop.scheduler  # noqa: SLF001 - the bench reads the live counters
    before = dict(sched.preemptions)
    start = time.perf_counter()
    flood = [asyncio.create_task(client.generate(
        OPEN[(i + 3) % len(OPEN)], args.batch_tokens, tree=args.tree, ignore_eos=True,
        priority=priority)) for i in range(args.batch)]
    while sched.num_running + sched.num_waiting < args.batch:  # all queued
        await asyncio.sleep(0.005)
    await asyncio.sleep(args.settle_s)  # the flood is decoding, not just prefilling
    ttfts, outs = await interactive_run(client, args)
    results = await asyncio.gather(*flood, return_exceptions=True)
    elapsed = time.perf_counter() - start
    done = [r for r in results if not isinstance(r, BaseException)]
    return {"ttft": ttfts, "outs": outs,
            "preemptions": {k: v - before.get(k, 0) for k, v in sched.preemptions.items()},
            "batch_finished": sum(r.finish_reason == "length" for r in done),
            "batch_errors": [repr(r) for r in results if isinstance(r, BaseException)],
            "flood_tokens_per_s": sum(len(r.token_ids) for r in done) / elapsed}


def summary(ttft: list[float], base_p95: float) -> dict:
    return {"ttft_p50_s": round(statistics.median(ttft), 4), "ttft_p95_s": round(p95(ttft), 4),
            "p95_vs_no_load": round(p95(ttft) / base_p95, 2)}


async def run(args) -> dict:
    target, draft = resolve_pair(args.target, args.draft)
    extra = ["--kv-cache-mb", str(args.kv_cache_mb)] if args.kv_cache_mb else []
    async with LocalStack(target, draft, extra_verify_args=extra, quiet=True) as stack:
        limits = SchedulerConfig(batch=ClassLimits(max_round_tokens=args.batch_round_tokens))
        async with AsyncSpecMeshClient(stack.verify_addr, stack.draft_addr, str(target),
                                       scheduler=limits) as c:
            await interactive_run(c, argparse.Namespace(**{**vars(args), "interactive": 2}))
            base, want = await interactive_run(c, args)
            out = {"no_load": summary(base, p95(base))}
            for name, priority in (("batch_flood", "batch"), ("fifo_flood", "interactive")):
                phase = await flood_phase(c, args, priority)
                out[name] = {**summary(phase["ttft"], p95(base)),
                             **{k: phase[k] for k in ("preemptions", "batch_finished",
                                                      "batch_errors")},
                             "flood_tokens_per_s": round(phase["flood_tokens_per_s"], 1),
                             "same_output": phase["outs"] == want}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specmesh.loadtest.priority_bench")
    parser.add_argument("--target", default=None)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--interactive", type=int, default=16)
    parser.add_argument("--interactive-tokens", type=int, default=16)
    parser.add_argument("--tree", type=TreeSpec.parse, default=TreeSpec.parse("chain:4"))
    parser.add_argument("--kv-cache-mb", type=float, default=None)
    parser.add_argument("--batch-round-tokens", type=int, default=DEFAULT_BATCH.max_round_tokens,
                        help="the batch class's share of a round while interactive work is "
                        "recent")
    parser.add_argument("--gap-s", type=float, default=0.05)
    parser.add_argument("--settle-s", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print every interactive request")
    args = parser.parse_args(argv)
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
        return
    for name, row in out.items():
        print(f"{name:12s} " + "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
