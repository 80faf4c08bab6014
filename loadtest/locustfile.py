"""Locust load test against the gateway's GenerateService (sync gRPC stubs under gevent).

    specmesh up &                       # gateway on 127.0.0.1:50051
    locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 60s --host 127.0.0.1:50051

Reported per request: `generate` (whole stream), `time_to_first_token`, `per_token` latency
(total / generated tokens) and `accepted_per_round` (mean accepted draft tokens per round,
reported in the response-time column, x1000 for resolution) as separate locust entries.
Env: SPECMESH_MAX_NEW_TOKENS (default 64), SPECMESH_TREE (default: the gateway's),
SPECMESH_PROMPTS: `fresh` (default) builds each prompt from random parts (~60,000 of them), so
the result cache almost never answers and the test measures decoding; `fixed` draws from six
prompts, so after the first few requests the cache replays them (measures the cache path).
"""

from __future__ import annotations

import os
import random
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import grpc  # noqa: E402
from locust import User, between, task  # noqa: E402

from specmesh.v1 import generate_pb2, generate_pb2_grpc  # noqa: E402
from specmesh.wire.tree_spec import TreeSpec  # noqa: E402

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the", "One day, a bird",
           "Lily wanted to", "The sun was"]
NAMES = ["Lily", "Tom", "Sue", "Ben", "Max", "Mia", "Sam", "Anna", "Tim", "Zoe", "Jack", "Lucy",
         "Spot", "Kitty", "Bob", "Sara", "Leo", "Emma", "Jim", "Amy"]
THINGS = ["ball", "tree", "cake", "boat", "kite", "dog", "cat", "park", "book", "toy", "bird",
          "flower", "car", "house", "apple", "box", "hat", "fish", "star", "sun", "moon", "rock",
          "lake", "bike", "cup"]
VERBS = ["found", "saw", "wanted", "liked", "lost", "made", "had", "gave", "took", "shared"]


def fresh_prompt(rng: random.Random) -> str:
    """One of 6 x 20 x 10 x 25 = 30,000 x 2 prompts: a cache replay is rare."""
    opening = rng.choice(PROMPTS)
    tail = f"{rng.choice(NAMES)} {rng.choice(VERBS)} a {rng.choice(THINGS)}"
    return f"{opening}, {tail}" if rng.random() < 0.5 else f"{tail}. {opening}"


def fixed_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPTS)


class GenerateUser(User):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(self.host)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)
        self.max_new_tokens = int(os.environ.get("SPECMESH_MAX_NEW_TOKENS", "64"))
        tree = os.environ.get("SPECMESH_TREE")
        self.tree = TreeSpec.parse(tree).to_proto() if tree else None
        mode = os.environ.get("SPECMESH_PROMPTS", "fresh")
        if mode not in ("fresh", "fixed"):
            raise ValueError(f"SPECMESH_PROMPTS={mode!r}: fresh or fixed")
        self.prompt = fresh_prompt if mode == "fresh" else fixed_prompt
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        self.environment.events.request.fire(request_type="grpc", name=name, response_time=ms,
                                             response_length=length, exception=exc, context={})

    @task
    def generate(self) -> None:
        req = generate_pb2.GenerateRequest(text=self.prompt(self.rng),
                                           max_new_tokens=self.max_new_tokens)
        if self.tree is not None:
            req.tree_spec.CopyFrom(self.tree)
        start = time.perf_counter()
        first = None
        final = None
        try:
            for msg in self.stub.Generate(req, timeout=120):
                if first is None and msg.token_ids:
                    first = time.perf_counter() - start
                if msg.finish_reason:
                    final = msg
        except grpc.RpcError as err:
            self._fire("generate", (time.perf_counter() - start) * 1000, 0, err)
            return
        total = time.perf_counter() - start
        if final is None:
            self._fire("generate", total * 1000, 0, RuntimeError("stream ended without a "
                                                                "finish_reason"))
            return
        n = final.stats.num_generated_tokens
        self._fire("generate", total * 1000, n)
        self._fire("time_to_first_token", (first or total) * 1000)
        self._fire("per_token", total * 1000 / max(n, 1), n)
        self._fire("accepted_per_round", final.stats.mean_accepted_per_round * 1000)
