"""`specmesh bench`: target-only vs speculative through our stack vs HF transformers, one run.

    python -m specmesh.loadtest.bench --concurrency 1,4,16 --max-new-tokens 128 --plot bench.png

On the same prompts, greedy, every request exactly --max-new-tokens tokens:
  1. our stack, target-only (speculation off), at each concurrency;
  2. our stack, speculative, at each concurrency, for each tree config;
  3. HF transformers `generate`, target alone and with `assistant_model=` the draft
     (sequential: HF assisted generation is batch 1 only), after our stack has stopped.
Prints a table and throughput ratios, and checks that every output equals our target-only output
for its prompt (exit status 1 on any mismatch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import sys
import time

from specmesh.clients.cli import chat_prompts
from specmesh.clients.models import resolve_pair
from specmesh.clients.tokenizer import TextCodec
from specmesh.clients.types import DEFAULT_TREE
from specmesh.loadtest.bench_report import format_report, to_json, write_plot
from specmesh.loadtest.bench_results import TARGET, ModeRun, check_outputs, compute_ratios
from specmesh.loadtest.bench_stack import SpecConfig, run_stack
from specmesh.loadtest.prompts import SETS
from specmesh.wire.tree_spec import TreeSpec

SPEED_OK = 0.95  # issue 4: loaded speculative throughput must stay >= this x target-only


def parse_ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: need positive integers like 1,4,16")
    return values


def parse_specs(text: str) -> list[SpecConfig]:
    """'chain:4,static:4,2,2,1,dynamic:16+adaptive' -> configs (bare numbers continue a
    static tree's branching list; a '+adaptive' suffix sizes the tree each round)."""
    parts: list[str] = []
    for piece in re.split(r"[,;]", text):
        piece = piece.strip()
        if parts and re.fullmatch(r"\d+(\+adaptive)?", piece):
            parts[-1] += "," + piece
        elif piece:
            parts.append(piece)
    specs = []
    for part in parts:
        tree_text, plus, flag = part.partition("+")
        if plus and flag != "adaptive":
            raise argparse.ArgumentTypeError(f"{part!r}: the only suffix is +adaptive")
        try:
            tree = TreeSpec.parse(tree_text).validate("tree")
        except Exception as exc:  # ValueError or InvalidRequest
            raise argparse.ArgumentTypeError(str(exc)) from exc
        if not tree.enabled:
            raise argparse.ArgumentTypeError(f"{part!r}: target-only always runs; give a tree")
        specs.append(SpecConfig(tree, adaptive=bool(plus)))
    if not specs:
        raise argparse.ArgumentTypeError("no tree given")
    return specs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specmesh bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=parse_ints, default=[1, 4, 16],
                   help="concurrency levels (default 1,4,16); each level runs "
                        "max(c, num_prompts) requests")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=8,
                   help="requests per level at least, and the HF runs' prompts (default 8)")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternate the modes of each level this many times and pool them "
                        "(steadier numbers on a shared machine; default 1)")
    p.add_argument("--tree", type=parse_specs, default=None,
                   help=f"speculative tree config (default {DEFAULT_TREE})")
    p.add_argument("--trees", type=parse_specs, default=None,
                   help="several configs: chain:4,static:4,2,2,1,dynamic:16 (+adaptive suffix)")
    p.add_argument("--target", default=None, help="target model folder or name")
    p.add_argument("--draft", default=None, help="draft model folder or name, or 'ngram' "
                   "(model-free drafting; the HF row is then HF's prompt lookup)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads for every model process (the services and the "
                        "in-process HF runs), via OMP_NUM_THREADS; default: torch's default")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (seeded; default 0 = greedy). Sampled "
                        "outputs are not compared token for token and HF rows are skipped")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus for --temperature")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    p.add_argument("--prompts", choices=sorted(SETS), default="open",
                   help="open: story openings; grounded: a passage and a request to copy from "
                        "it (where n-gram drafting pays)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (table to stderr, no progress bar)")
    p.add_argument("--plot", type=pathlib.Path, default=None, help="write a PNG plot here")
    p.add_argument("--device", default="cpu",
                   help="torch device of both model services and the HF runs ('cuda')")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="weights/KV dtype of both services and the HF runs (default: the "
                        "services' own, float32; HF float32)")
    return p


def _specs(args: argparse.Namespace) -> list[SpecConfig]:
    chosen = (args.tree or []) + (args.trees or [])
    unique = list({s.name: s for s in chosen}.values())
    return unique or [SpecConfig(DEFAULT_TREE)]


def _decoding(args: argparse.Namespace) -> str:
    if args.temperature == 0:
        return "greedy"
    return f"sampling (temperature {args.temperature}, top_p {args.top_p}, seeded)"


def _load_average() -> float:
    """1-minute load average (0.0 where the OS has none): the machine may be shared."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _where(args: argparse.Namespace) -> str:
    """'cpu float32' or, on a GPU, 'cuda bfloat16 (NVIDIA H200)'."""
    where = f"{args.device} {args.dtype or 'float32'}"
    if args.device.startswith("cuda"):
        import torch

        where += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    return where


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _apply_threads(threads: int | None) -> None:
    """OMP_NUM_THREADS is read by torch at import: the service subprocesses inherit it, and this
    process has not imported torch yet (the HF baselines import it after our stack stops)."""
    if threads is None:
        return
    if threads <= 0:
        raise ValueError("--threads must be >= 1")
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def _measure(args: argparse.Namespace, target: pathlib.Path, draft: pathlib.Path,
             specs: list[SpecConfig], concurrencies: list[int]) -> list[ModeRun]:
    """Our stack at every level, then (stack stopped) the HF baselines on the first prompts."""
    codec = TextCodec(target)
    num_needed = max(args.num_prompts, max(concurrencies))
    texts = SETS[args.prompts]
    texts = [texts[i % len(texts)] for i in range(num_needed)]
    prompts = (chat_prompts(target, texts, codec) if args.chat
               else [codec.encode(t) for t in texts])
    runs = asyncio.run(run_stack(target, draft, prompts, concurrencies, specs,
                                 args.max_new_tokens, args.num_prompts, args.repeats, _log,
                                 args.temperature, args.top_p, quiet=args.json,
                                 device=args.device, dtype=args.dtype))
    if not args.no_hf and args.temperature == 0:
        from specmesh.loadtest.bench_hf import run_hf  # torch + transformers only when asked

        runs += run_hf(target, draft, prompts[:args.num_prompts], args.max_new_tokens,
                       args.repeats, _log, quiet=args.json, device=args.device,
                       dtype=args.dtype or "float32")
    return runs


def run(args: argparse.Namespace) -> int:
    if min(args.max_new_tokens, args.num_prompts, args.repeats) <= 0:
        raise ValueError("--max-new-tokens, --num-prompts and --repeats must be >= 1")
    _apply_threads(args.threads)
    target, draft = resolve_pair(args.target, args.draft)
    specs, concurrencies = _specs(args), sorted(set(args.concurrency))
    started, load_before = time.perf_counter(), _load_average()
    runs = _measure(args, target, draft, specs, concurrencies)
    elapsed, load_after = time.perf_counter() - started, _load_average()
    _log(f"done in {elapsed:.0f} s")

    rows = sorted((r.row for r in runs), key=lambda r: (r.system != "specmesh", r.kind != TARGET,
                                                        r.tree, r.concurrency))
    names = [s.name for s in specs]
    ratios = compute_ratios(rows, names)
    check = check_outputs(runs, args.max_new_tokens, exact=args.temperature == 0,
                          hf_exact=(args.dtype or "float32") == "float32")
    hi = concurrencies[-1]
    by_name = {r.name: r.value for r in ratios}
    checks = {f"spec >= {SPEED_OK}x target-only at c={hi} [{name}]":
              by_name[f"spec/target c={hi} [{name}]"] >= SPEED_OK
              for name in names if f"spec/target c={hi} [{name}]" in by_name}
    title = (f"specmesh bench: target {target.name}, draft {draft.name if draft else 'ngram'}, "
             f"{args.prompts} prompts{' (chat)' if args.chat else ''}\n"
             f"{_decoding(args)}, {args.max_new_tokens} new tokens, {args.num_prompts} prompts x {args.repeats}, "
             f"{os.cpu_count()} CPUs, {_where(args)}, threads {args.threads or 'default'}, "
             f"load average {load_before:.1f} -> {load_after:.1f}, {elapsed:.0f} s")
    report = format_report(title, rows, ratios, check, checks, exact=args.temperature == 0)
    if args.json:
        config = {"target": str(target), "draft": str(draft or "ngram"),
                  "prompts": args.prompts, "chat": args.chat, "concurrency": concurrencies,
                  "max_new_tokens": args.max_new_tokens, "num_prompts": args.num_prompts,
                  "repeats": args.repeats,
                  "trees": names, "hf": not args.no_hf and args.temperature == 0,
                  "temperature": args.temperature, "top_p": args.top_p, "threads": args.threads,
                  "cpu_count": os.cpu_count(), "device": args.device,
                  "dtype": args.dtype or "float32", "load_average": [load_before, load_after],
                  "elapsed_s": elapsed}
        print(report, file=sys.stderr, flush=True)
        print(json.dumps(to_json(config, rows, ratios, check, checks)), flush=True)
    else:
        print(report, flush=True)
    if args.plot is not None:
        write_plot(args.plot, title, rows)
        _log(f"plot written to {args.plot}")
    return 1 if check.total else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"specmesh bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
