"""Bytes of a ProposeResponse per round (tree + sparse fp16 draft distributions).

    python -m specmesh.loadtest.message_bytes [--draft DIR]

Compares against what dense fp32 distributions over the whole vocabulary would cost.
"""

from __future__ import annotations

import argparse

from specmesh.draft_service.engine import DraftEngine, ProposeItem
from specmesh.kernels import load_model
from specmesh.kernels.sampling import SamplingConfig
from specmesh.model_service.config import EngineConfig
from specmesh.v1 import common_pb2, draft_pb2
from specmesh.wire.codec import encode_sparse
from specmesh.wire.tree_spec import TreeSpec

PROMPT = [1, 385, 328, 432, 261]  # "One day, a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default="../shared/models/stories260K-draft2L")
    args = parser.parse_args(argv)
    loaded = load_model(args.draft)
    engine = DraftEngine(loaded, EngineConfig(kv_cache_mb=64))
    vocab = loaded.config.vocab_size
    print(f"{'tree':12} {'sampling':22} {'nodes':>5} {'dists':>5} {'bytes':>7} {'dense fp32':>10}")
    for spec_text in ("chain:4", "dynamic:16"):
        for cfg in (SamplingConfig(0.0), SamplingConfig(1.0, 0.95, 0), SamplingConfig(1.0)):
            res = engine.propose_batch([ProposeItem("m", 0, PROMPT, TreeSpec.parse(spec_text),
                                                    cfg, seed=7)])[0]
            empty = common_pb2.SparseDistribution()
            msg = draft_pb2.ProposeResponse(
                tree=common_pb2.TokenTree(tokens=res.tokens, parents=res.parents),
                draft_dists=[encode_sparse(*d) if d is not None else empty
                             for d in res.draft_dists])
            rows = sum(d is not None for d in res.draft_dists)
            label = f"T={cfg.temperature} top_p={cfg.top_p}"
            print(f"{spec_text:12} {label:22} {len(res.tokens):5} {rows:5} {msg.ByteSize():7} "
                  f"{rows * vocab * 4:10}")


if __name__ == "__main__":
    main()
