"""Timed runs through our own stack: target-only and speculative, at each concurrency.

One LocalStack (verify + draft subprocesses) and one AsyncSpecMeshClient serve every mode; the
concurrent requests of a level share the client, so the services' batchers merge them.
"""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import LocalStack
from specmesh.clients.types import GenerationParams
from specmesh.loadtest.bench_results import SPEC, TARGET, ModeRun, RequestSample, summarise
from specmesh.wire.progress import progress
from specmesh.wire.tree_spec import TreeSpec

WARMUP_TOKENS = 8
SAMPLING_SEED = 1234


@dataclass(frozen=True)
class SpecConfig:
    """One speculative configuration: a tree shape, optionally sized adaptively each round."""

    tree: TreeSpec
    adaptive: bool = False

    @property
    def name(self) -> str:
        return f"{self.tree}+adaptive" if self.adaptive else str(self.tree)


@dataclass(frozen=True)
class StackMode:
    kind: str  # TARGET | SPEC
    spec: SpecConfig | None = None
    temperature: float = 0.0  # 0 = greedy; else seeded sampling (same seed every request)
    top_p: float = 1.0

    @property
    def tree(self) -> str:
        return self.spec.name if self.spec else ""

    def params(self, max_new_tokens: int) -> GenerationParams:
        """Exactly max_new_tokens (ignore_eos), greedy or seeded sampling, speculating only in
        SPEC mode."""
        sampling = dict(temperature=self.temperature, top_p=self.top_p,
                        seed=SAMPLING_SEED if self.temperature > 0 else None)
        if self.spec is None:
            return GenerationParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                    speculate=False, **sampling)
        return GenerationParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                tree=self.spec.tree, speculate=True, adaptive=self.spec.adaptive,
                                **sampling)


async def timed_request(client: AsyncSpecMeshClient, prompt_index: int, prompt_ids: list[int],
                        params: GenerationParams) -> RequestSample:
    """One streamed request; TTFT is when the first event with tokens arrives."""
    start = time.perf_counter()
    ttft, result = None, None
    async for event in client.stream(prompt_ids, params.max_new_tokens, params=params):
        if ttft is None and event.token_ids:
            ttft = time.perf_counter() - start
        result = event.result or result
    latency = time.perf_counter() - start
    stats = result.stats
    return RequestSample(prompt_index, list(result.token_ids), latency,
                         ttft if ttft is not None else latency, stats.num_rounds,
                         stats.num_accepted_tokens)


async def run_level(client: AsyncSpecMeshClient, mode: StackMode, prompts: list[list[int]],
                    concurrency: int, num_requests: int, max_new_tokens: int,
                    done: Callable[[], object] = lambda: None,
                    ) -> tuple[list[RequestSample], float]:
    """`num_requests` requests (prompt i for request i), `concurrency` in flight at a time
    (closed loop: each worker starts its next request when the last one ends).
    Returns the samples and the wall time of the whole level."""
    params = mode.params(max_new_tokens)
    todo = iter(range(num_requests))  # shared by the workers
    samples: list[RequestSample] = []

    async def worker() -> None:
        for i in todo:
            samples.append(await timed_request(client, i, prompts[i], params))
            done()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


async def run_stack(target: pathlib.Path, draft: pathlib.Path, prompts: list[list[int]],
                    concurrencies: list[int], specs: list[SpecConfig], max_new_tokens: int,
                    num_prompts: int, repeats: int, log: Callable[[str], None],
                    temperature: float = 0.0, top_p: float = 1.0,
                    quiet: bool = False, device: str = "cpu", dtype: str | None = None,
                    ) -> list[ModeRun]:
    """Every mode at every concurrency. A level runs max(c, num_prompts) requests; concurrency
    is the outer loop and the modes alternate `repeats` times within it, so a noisy stretch of
    time hits the modes being compared alike (their requests and wall times are pooled).
    `device`/`dtype`: both model services' (`cuda`, `bfloat16`)."""
    modes = [StackMode(TARGET, None, temperature, top_p)] + [
        StackMode(SPEC, s, temperature, top_p) for s in specs]
    runs = []
    log(f"starting stack: target {target.name}, draft {draft.name if draft else 'ngram'}")
    total = repeats * len(modes) * sum(max(c, num_prompts) for c in concurrencies)
    method = "ngram" if draft is None else "model"  # draft None: model-free n-gram drafting
    async with LocalStack(target, draft, draft_method=method, quiet=quiet, device=device,
                          dtype=dtype) as stack, \
            AsyncSpecMeshClient(stack.verify_addr, stack.draft_addr) as client:
        bar = progress(total=total, desc="specmesh requests", unit="req", quiet=quiet)
        for mode in modes:  # warm-up: one short request per mode
            await timed_request(client, 0, prompts[0], mode.params(WARMUP_TOKENS))
        for c in concurrencies:
            pooled = {mode: ([], 0.0) for mode in modes}  # mode -> (samples, wall_s)
            for _ in range(repeats):
                for mode in modes:
                    bar.set_postfix_str(f"c={c} {mode.kind} {mode.tree}".strip())
                    samples, wall = await run_level(client, mode, prompts, c,
                                                    max(c, num_prompts), max_new_tokens,
                                                    lambda: bar.update(1))
                    pooled[mode] = (pooled[mode][0] + samples, pooled[mode][1] + wall)
            for mode, (samples, wall) in pooled.items():
                run = summarise("specmesh", mode.kind, mode.tree, c, samples, wall)
                bar.clear()
                log(f"{run.row.label}: {len(samples)} requests, {run.row.tokens_per_s:.1f} tok/s")
                runs.append(run)
        bar.close()
    return runs
