"""Speculation with both engines in one process: no RPC, no services, modes interleaved.

    python -m specmesh.loadtest.engine_loop --trees chain:4,dynamic:8 --repeats 2 --ab-cpu-layer

Runs the bench's story openings (greedy, --max-new-tokens each) through the draft and verify
engines exactly as the services do per round (ProposeItem -> propose_batch, VerifyItem ->
verify_batch, the caches kept across rounds), target-only and for each tree, alternating the
modes `--repeats` times. It prints per mode: tokens per round, propose and verify ms per round
(wall) and tokens/s with its ratio to target-only. What the engines can do; `specmesh bench`
then shows what the service path keeps of it. `--ab-cpu-layer` also runs every mode with the
fused CPU layers off (`kernels.cpu_layer`), interleaved, and checks the tokens are identical.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from specmesh.model_service.openmp import tune_openmp

tune_openmp()  # as the model services do, before torch loads

from specmesh.clients.models import resolve_pair  # noqa: E402
from specmesh.clients.scheduled import chain_matched  # noqa: E402
from specmesh.clients.tokenizer import TextCodec  # noqa: E402
from specmesh.draft_service.engine import DraftEngine, ProposeItem  # noqa: E402
from specmesh.kernels import load_for_service  # noqa: E402
from specmesh.loadtest.prompts import OPEN  # noqa: E402
from specmesh.model_service.config import EngineConfig  # noqa: E402
from specmesh.verify_service.engine import VerifyEngine, VerifyItem  # noqa: E402
from specmesh.wire.tree_spec import TreeSpec  # noqa: E402


@dataclass
class Tally:
    tokens: int = 0
    rounds: int = 0
    propose_s: float = 0.0
    verify_s: float = 0.0

    def row(self, name: str, base: float | None) -> str:
        tps = self.tokens / (self.propose_s + self.verify_s)
        ratio = f"{tps / base:.2f}x" if base else "1.00x"
        per_round = 1e3 / self.rounds
        return (f"{name:24s} {self.tokens / self.rounds:9.2f} {self.propose_s * per_round:11.2f}"
                f" {self.verify_s * per_round:10.2f} {tps:9.1f} {ratio:>8s}")


def generate(draft: DraftEngine, verify: VerifyEngine, prompt: list[int], spec: TreeSpec | None,
             max_new: int, tally: Tally, seq_id: str, idle_s: float = 0.0) -> list[int]:
    """One request, round by round as the client drives the services; its new tokens.
    `idle_s`: sleep before each engine call (untimed), as a service waits while the other runs."""
    tokens, d_cached, v_cached = list(prompt), 0, 0
    while len(tokens) - len(prompt) < max_new:
        if idle_s and spec is not None:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        proposal = None
        if spec is not None:
            proposal = draft.propose_batch([ProposeItem(
                seq_id=seq_id, num_cached_tokens=d_cached, new_tokens=tokens[d_cached:],
                spec=spec)])[0]
        t1 = time.perf_counter()
        if idle_s and spec is not None:  # target-only: the verify service never waits on a draft
            time.sleep(idle_s)
        t1_verify = time.perf_counter()
        result = verify.verify_batch([VerifyItem(
            seq_id=seq_id, num_cached_tokens=v_cached, new_tokens=tokens[v_cached:],
            tree_tokens=proposal.tokens if proposal else [],
            tree_parents=proposal.parents if proposal else [])])[0]
        t2 = time.perf_counter()
        for out in (proposal, result):
            if isinstance(out, Exception):
                raise RuntimeError(f"engine error: {out}")
        if proposal is not None:  # the draft's chain nodes past the accepted ones are not ours
            d_cached = min(proposal.num_cached_tokens, len(tokens) + chain_matched(
                proposal.tokens, proposal.parents, result.tokens, result.num_accepted_draft_tokens))
        tokens += result.tokens
        v_cached = result.num_cached_tokens
        tally.tokens += len(result.tokens)
        tally.rounds += 1
        tally.propose_s += t1 - t0
        tally.verify_s += t2 - t1_verify
    draft.release([seq_id])
    verify.release([seq_id])
    return tokens[len(prompt):len(prompt) + max_new]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--trees", default="chain:4,dynamic:8")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16")
    ap.add_argument("--draft-quantize", default="int8", choices=("none", "int8"),
                    help="the draft's projection weights (the draft service's default: int8)")
    ap.add_argument("--idle-ms", type=float, default=0.0,
                    help="sleep this long (untimed) before each engine call, as each service "
                         "idles while the other works")
    ap.add_argument("--ab-cpu-layer", action="store_true",
                    help="also run each mode with the fused CPU layers off, interleaved")
    args = ap.parse_args(argv)
    target_dir, draft_dir = resolve_pair(args.target, args.draft)
    codec = TextCodec(target_dir)
    prompts = [codec.encode(p) for p in OPEN[:args.num_prompts]]
    t_loaded = load_for_service(target_dir, args.dtype, args.device, args.threads)
    d_loaded = load_for_service(draft_dir, args.dtype, args.device, args.threads,
                                quantize=args.draft_quantize)
    verify, draft = VerifyEngine(t_loaded, EngineConfig()), DraftEngine(d_loaded, EngineConfig())
    fused = {True: (t_loaded.model.fused_layers, d_loaded.model.fused_layers),
             False: (None, None)}
    layers = (True, False) if args.ab_cpu_layer else (True,)
    specs = [("target-only", None)] + [(s, TreeSpec.parse(s)) for s in args.trees.split(",")]
    tallies = {(name, on): Tally() for name, _ in specs for on in layers}
    outputs: dict[tuple, list[list[int]]] = {}
    for rep in range(args.repeats):
        for name, spec in specs:
            for on in layers:
                t_loaded.model.fused_layers, d_loaded.model.fused_layers = fused[on]
                outs = [generate(draft, verify, p, spec, args.max_new_tokens,
                                 tallies[(name, on)], f"{name}-{on}-{rep}-{i}",
                                 args.idle_ms / 1e3)
                        for i, p in enumerate(prompts)]
                outputs.setdefault((name, on), outs)
    reference = outputs[("target-only", True)]
    same = all(o == reference for o in outputs.values())
    print(f"engine loop: {target_dir.name} + {draft_dir.name}, {len(prompts)} prompts x "
          f"{args.max_new_tokens} tokens, {args.repeats} repeats, {args.device} "
          f"{args.dtype}, fused layers "
          f"{'on/off' if args.ab_cpu_layer else 'on'}, idle {args.idle_ms:g} ms before each call")
    print(f"{'mode':24s} {'tok/round':>9s} {'propose ms':>11s} {'verify ms':>10s} "
          f"{'tok/s':>9s} {'x target':>8s}")
    for on in layers:
        base = tallies[("target-only", on)]
        base_tps = base.tokens / (base.propose_s + base.verify_s)
        for name, _ in specs:
            label = name if not args.ab_cpu_layer else f"{name} [{'fused' if on else 'ops'}]"
            print(tallies[(name, on)].row(label, None if name == "target-only" else base_tps))
    print(f"outputs: {'all identical' if same else 'MISMATCH'} token for token")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
