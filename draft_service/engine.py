"""The draft engine: draft model + paged KV; proposes token trees for a batch of sequences.

One draft forward per tree depth for the whole batch. No gRPC here: items in, results or the
item's `specmesh.wire` exception out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from specmesh.draft_service.tree_builder import TreeGrower
from specmesh.errors import CapacityExhausted, InvalidRequest
from specmesh.kernels.cpu_chain import ChainDraws, ChainRunner
from specmesh.kernels.cuda_chain import CudaChain
from specmesh.kernels.runner import ForwardItem
from specmesh.kernels.sampling import SamplingConfig
from specmesh.kernels.seeding import round_generator
from specmesh.kernels.tree import compile_tree
from specmesh.model_service.config import EngineConfig
from specmesh.model_service.engine import SequenceEngine, SequenceItem
from specmesh.model_service.prefix_kv import seed_prefix
from specmesh.wire.tree_spec import TreeSpec

log = logging.getLogger(__name__)
MAX_FOLD_NEW = 4  # new tokens a chain call takes in front of a chain (`_feed_forced`)


@dataclass(frozen=True)
class ProposeItem(SequenceItem):
    spec: TreeSpec
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None
    # New sequences only: cached KV of the prompt's first chunks, each [L, 2, chunk, Hkv, D]
    prefix_chunks: tuple[np.ndarray, ...] = ()

    @property
    def cost(self) -> int:
        """Tokens this item adds to a batched forward (the first one; each depth adds more)."""
        return self.num_fed + self.spec.max_nodes


@dataclass(frozen=True)
class ProposeResult:
    tokens: list[int]
    parents: list[int]
    draft_dists: list[tuple[np.ndarray, np.ndarray] | None]  # sampling only; see proto
    num_cached_tokens: int


class DraftEngine(SequenceEngine):
    def __init__(self, loaded, config: EngineConfig = EngineConfig()):
        super().__init__(loaded, config)
        # chains: their depths through one C loop where the CPU kernels run this model, or
        # (greedy) one CUDA graph on a GPU
        self.chain = (ChainRunner.build(loaded.model) if loaded.device.type == "cpu"
                      else CudaChain.build(loaded, self.runner.graphs))
        # chains fed one new token (the usual round: the draft keeps its own chain's KV, so
        # only the verifier's bonus token is new) skip the separate first forward: the C chain
        # feeds that token itself (CPU; a GPU's chain graph is not measured so yet)
        self.fold_first = isinstance(self.chain, ChainRunner)

    def propose_batch(self, items: list[ProposeItem]) -> list[ProposeResult | Exception]:
        """One forward for the new tokens of every item, then one per tree depth; each failure
        is confined to its item (a failed forward fails only the items in it, uncommitted)."""
        results, prepared = self.prepare_each(items, self._prepare_grower)
        ready = [(i, fwd, grower) for i, (fwd, grower) in prepared]
        if not ready:
            return results  # type: ignore[return-value]
        try:
            committed = self._run(ready)
        except Exception as exc:  # noqa: BLE001 - a fault of the model run: fail these items
            log.exception("draft forward failed")
            for i, fwd, _ in ready:
                self.sequences.release([fwd.seq_id])  # its KV may be half written
                results[i] = exc
            return results  # type: ignore[return-value]
        for i, fwd, grower in ready:
            self._keep_chain(fwd.seq_id, grower, committed[fwd.seq_id])
            grower.finish()
            results[i] = ProposeResult(grower.tokens, grower.parents, grower.sparse_dists(),
                                       self.kv.num_tokens(fwd.seq_id))
        return results  # type: ignore[return-value]

    def _run(self, ready: list[tuple[int, ForwardItem, TreeGrower]]) -> dict[str, int]:
        """The new tokens' forward, then the tree's; returns each sequence's committed length."""
        steps = self._folded_steps(ready)
        if steps:
            return self._run_folded(ready, steps)
        outs = self.runner.forward([fwd for _, fwd, _ in ready])
        for (_, fwd, grower), logits in zip(ready, _on_cpu([out.logits for out in outs])):
            self.sequences.commit(fwd.seq_id, fwd.new_tokens)
            if grower.spec.enabled:
                grower.grow_root(logits[0])
        committed = {fwd.seq_id: self.kv.num_tokens(fwd.seq_id) for _, fwd, _ in ready}
        self._grow(ready)
        return committed

    def _keep_chain(self, seq_id: str, grower: TreeGrower, committed: int) -> None:
        """Drop a tree's KV; keep a chain's (or a spine's): its nodes were fed as causal
        tokens, so they stay as the sequence's next tokens (reported in num_cached_tokens) and
        the next request, cached up to the nodes the verifier accepted, re-runs only what came
        after them."""
        fed = self.kv.num_tokens(seq_id) - committed
        if not grower.is_chain or not 0 < fed <= len(grower.tokens):
            self.kv.truncate(seq_id, committed)
            return
        self.sequences.commit(seq_id, grower.tokens[:fed])

    def _folded_steps(self, ready: list[tuple[int, ForwardItem, TreeGrower]]) -> int:
        """The chain length when every item is a greedy chain of that length fed the same
        number (1..MAX_FOLD_NEW) of new tokens and the chain runner takes them all in its
        calls (`fold_first`); else 0."""
        if not self.fold_first or self.chain is None:
            return 0
        shapes = {(min(g.spec.depth, g.spec.max_nodes), len(fwd.new_tokens))
                  if g.is_chain and g.spec.enabled and fwd.tree is None
                  and 1 <= len(fwd.new_tokens) <= MAX_FOLD_NEW else (0, 0)
                  for _, fwd, g in ready}
        steps, fed = shapes.pop() if len(shapes) == 1 else (0, 0)
        seq_ids = [fwd.seq_id for _, fwd, _ in ready]
        if not steps or not self.chain.fits(self.kv, seq_ids, steps + fed - 1):
            return 0
        sampled = not all(g.sampling.greedy for _, _, g in ready)
        return 0 if sampled and not self.chain.samples_in_one_call(len(ready), steps) else steps

    def _run_folded(self, ready: list[tuple[int, ForwardItem, TreeGrower]],
                    steps: int) -> dict[str, int]:
        """`_run` for `_folded_steps` batches: the chain runner feeds each item's new tokens
        (all but the last forced, `_feed_forced`) and its `steps` draft nodes (the first one
        what the separate forward's argmax would be)."""
        seq_ids = [fwd.seq_id for _, fwd, _ in ready]
        growers = [g for _, _, g in ready]
        new = [fwd.new_tokens for _, fwd, _ in ready]  # [B][n], n alike
        committed = {s: self.kv.num_tokens(s) + len(toks) for s, toks in zip(seq_ids, new)}
        self._feed_forced(seq_ids, new)
        # the root's node too (sampled: from the exponentials drawn now, in the same order)
        self._chain_call(growers, seq_ids, [toks[-1] for toks in new], steps, start=True)
        for _, fwd, _ in ready:
            end = self.kv.num_tokens(fwd.seq_id)  # the new tokens, then the fed chain nodes
            self.kv.set_num_tokens(fwd.seq_id, committed[fwd.seq_id])
            self.sequences.commit(fwd.seq_id, fwd.new_tokens)  # (checks tokens == KV count)
            self.kv.set_num_tokens(fwd.seq_id, end)
        return committed

    def _chain_call(self, growers: list[TreeGrower], seq_ids: list[str], first: list[int],
                    steps: int, start: bool) -> None:
        """All `steps` depths of the chains in one chain-runner call, each grower given its
        nodes (start: from the root), with each depth's distribution where a spine needs it."""
        vocab = self.loaded.config.vocab_size
        logits = torch.empty(len(growers), steps, vocab) if any(g.spine for g in growers) \
            else None  # [B, steps, vocab]
        extra = {} if logits is None else {"logits_out": logits}
        draws = None
        if all(g.sampling.greedy for g in growers):
            chains = self.chain.run(self.kv, seq_ids, first, steps, **extra)
        else:
            draws = _draws(growers, steps, vocab)
            chains, q = self.chain.run_sampled(self.kv, seq_ids, first, steps, draws, **extra)
        greedy_q = None if logits is None else torch.softmax(logits, -1).numpy()
        for row, (g, tokens) in enumerate(zip(growers, chains)):
            if g.sampling.greedy:
                rows = greedy_q[row] if g.spine else None
                (g.start_chain if start else g.extend_chain)(tokens, rows)
            else:
                expo = draws.expo[row].numpy() if g.spine else None
                extend = g.start_sampled_chain if start else g.extend_sampled
                extend(tokens, q[row].numpy(), expo)

    def _feed_forced(self, seq_ids: list[str], new: list[list[int]]) -> None:
        """All but the last of each sequence's new tokens through the chain runner, one
        depth each, its choice forced to the next given token (logits unused). A round that
        accepted a whole chain sends two (the last node, never fed, and the bonus token): a
        1-row C depth per extra token costs less than the separate Python forward of all of
        them that the round ran before (chain:5 in process, one thread: 2.14 -> 2.02 ms a round)."""
        if len(new[0]) == 1:
            return
        columns = iter(range(1, len(new[0])))

        def forced(_logits: torch.Tensor) -> list[int]:
            col = next(columns)
            return [toks[col] for toks in new]
        self.chain.run(self.kv, seq_ids, [toks[0] for toks in new], len(new[0]) - 1, forced)

    def _grow(self, ready: list[tuple[int, ForwardItem, TreeGrower]]) -> None:
        """One batched forward per depth over every tree still growing. A chain's next node
        is fed as an ordinary causal token (same KV position as tree node, no tree mask or
        tree compilation); the caller truncates all of it away afterwards."""
        while True:
            growing = [(fwd, g) for _, fwd, g in ready if g.needs_forward]
            if not growing:
                return
            steps = self._chain_steps([g for _, g in growing])
            if steps and (self.chain.samples or all(g.sampling.greedy for _, g in growing)) \
                    and self.chain.fits(self.kv, [fwd.seq_id for fwd, _ in growing], steps) \
                    and self._run_chain([g for _, g in growing],
                                        [fwd.seq_id for fwd, _ in growing], steps):
                continue
            outs = self.runner.forward([self._depth_item(fwd.seq_id, g) for fwd, g in growing])
            for (_, g), logits in zip(growing, _on_cpu([out.logits for out in outs])):
                g.grow(logits)

    def _run_chain(self, growers: list[TreeGrower], seq_ids: list[str], steps: int) -> bool:
        """The chains' remaining depths in one call where the chain runner can (greedy rows the
        argmax, sampled rows a draw from pre-drawn exponentials): `kernels.cpu_chain` in C,
        `kernels.cuda_chain` in one CUDA graph; else (a large vocabulary on the CPU) one C call
        per depth, each depth's tokens drawn in Python (`TreeGrower.grow`). False: the CUDA
        graph failed (logged, turned off) and nothing was run: the caller runs the depths one
        forward each."""
        first = [g.tokens[g.frontier[-1]] for g in growers]
        try:
            if all(g.sampling.greedy for g in growers) \
                    or self.chain.samples_in_one_call(len(growers), steps):
                self._chain_call(growers, seq_ids, first, steps, start=False)
                return True
            if isinstance(self.chain, CudaChain):
                return False  # too many exponentials to stage: one graphed forward a depth
        except Exception:
            if not isinstance(self.chain, CudaChain):
                raise
            log.exception("draft chain CUDA graph failed: chains run depth by depth")
            self.chain = None
            return False

        def choose(logits):  # [B, vocab]
            for row, g in enumerate(growers):
                g.grow(logits[row:row + 1])
            return [g.tokens[g.frontier[-1]] for g in growers]
        self.chain.run(self.kv, seq_ids, first, steps, choose)
        return True

    def _chain_steps(self, growers: list[TreeGrower]) -> int:
        """Depths left if every grower is a chain with as many left, else 0."""
        if self.chain is None or not all(g.is_chain for g in growers):
            return 0
        left = {g.chain_left for g in growers}
        return left.pop() if len(left) == 1 else 0

    def _prepare_grower(self, item: ProposeItem, keep: set[str]
                        ) -> tuple[ForwardItem, TreeGrower]:
        fwd, num_seeded = self._prepare(item, keep)
        gen = None if item.sampling.greedy else round_generator(
            item.seed, item.num_cached_tokens + num_seeded + len(fwd.new_tokens), "draft")
        spine = item.spec.kind == "dynamic" and isinstance(self.chain, ChainRunner)
        return fwd, TreeGrower(item.spec, item.sampling, gen, spine=spine)

    @staticmethod
    def _depth_item(seq_id: str, grower: TreeGrower) -> ForwardItem:
        if grower.is_chain:
            return ForwardItem(seq_id, [grower.tokens[grower.frontier[-1]]])
        return ForwardItem(seq_id, [], compile_tree(grower.tokens, grower.parents),
                           list(grower.frontier))

    def _prepare(self, item: ProposeItem, keep: set[str]) -> tuple[ForwardItem, int]:
        """The forward to run and how many positions came from the cached prefix."""
        step = self.sequences.sync(item.seq_id, item.num_cached_tokens, item.new_tokens)
        total = step.num_cached + len(step.new_tokens) + item.spec.max_nodes
        if item.spec.enabled and total > self.sequences.max_context:
            raise InvalidRequest("tree_spec", f"{item.spec} would run past the context length")
        synced = step.num_cached
        step = seed_prefix(self.sequences, step, item.prefix_chunks, keep)
        fwd = ForwardItem(item.seq_id, step.new_tokens)
        need = step.num_cached + len(step.new_tokens) + item.spec.max_nodes
        no_room = self.sequences.reserve(item.seq_id, need, keep)
        if no_room is not None:
            raise CapacityExhausted(f"draft KV cache full: {no_room.needed} blocks needed, "
                                    f"{no_room.free} free")
        return fwd, step.num_cached - synced


def _draws(growers: list[TreeGrower], steps: int, vocab: int) -> ChainDraws:
    """Each row's sampling settings and its `steps` depths of exponentials, drawn now from
    its generator in the order the depth-by-depth path would draw them."""
    expo = torch.zeros(len(growers), steps, vocab, dtype=torch.float64)  # [B, steps, vocab]
    for row, g in enumerate(growers):
        if not g.sampling.greedy:
            expo[row].view(-1).exponential_(generator=g.generator)
    greedy = [g.sampling.greedy for g in growers]
    return ChainDraws([0.0 if z else g.sampling.temperature for g, z in zip(growers, greedy)],
                      [g.sampling.top_p for g in growers], [g.sampling.top_k for g in growers],
                      expo)


def _on_cpu(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each item's logits on the CPU, where trees grow: on a GPU one copy (and one sync) for
    the whole batch instead of one per sequence."""
    if not rows or rows[0].device.type == "cpu":
        return rows
    return list(torch.cat(rows).cpu().split([r.shape[0] for r in rows]))
