"""What n-gram drafting costs per sequence per round (the draft service's work, no RPC):

    python -m specmesh.loadtest.ngram_cost [--lengths 64,512,2048] [--rounds 200]

Random token histories (vocab 500) of each length, one token appended per round, `ngram:8`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from specmesh.draft_service.engine import ProposeItem
from specmesh.draft_service.ngram_engine import NgramDrafter
from specmesh.wire.tree_spec import TreeSpec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m specmesh.loadtest.ngram_cost")
    p.add_argument("--lengths", default="64,512,2048")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args(argv)
    rng, spec = np.random.default_rng(0), TreeSpec.parse("ngram:8")
    for length in (int(x) for x in args.lengths.split(",")):
        drafter = NgramDrafter()
        drafter.propose(ProposeItem("s", 0, rng.integers(0, 500, length).tolist(), spec))
        start = time.perf_counter()
        for r in range(args.rounds):
            drafter.propose(ProposeItem("s", length + r, [int(rng.integers(0, 500))], spec))
        per = (time.perf_counter() - start) / args.rounds
        print(f"history {length:6d} tokens: {1e6 * per:7.0f} us per sequence per round")


if __name__ == "__main__":
    main()
