"""The verify engine: target model + paged KV; verifies draft trees for a batch of sequences.

No gRPC here: requests arrive as `VerifyItem`s, results leave as `VerifyResult`s or as the
`specmesh.wire` exception of the item that failed (other items of the batch are unaffected).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from specmesh.errors import CapacityExhausted, InvalidRequest
from specmesh.kernels.attention_metadata import MAX_TREE_NODES
from specmesh.kernels.loader import LoadedModel
from specmesh.kernels.runner import ForwardItem
from specmesh.kernels.sampling import (
    Acceptance,
    SamplingConfig,
    greedy_accept,
    tree_rejection_sample,
    warp_logits_to_probs,
)
from specmesh.kernels.seeding import round_generator
from specmesh.kernels.tree import TreeBuffers, compile_tree
from specmesh.model_service.config import EngineConfig
from specmesh.model_service.engine import SequenceEngine, SequenceItem
from specmesh.model_service.prefix_kv import seed_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyItem(SequenceItem):
    tree_tokens: list[int] = field(default_factory=list)
    tree_parents: list[int] = field(default_factory=list)
    # Sampling only, one per tree node + 1 (row 0 = root): (token_ids [s], probs_f16 [s]) or None
    draft_dists: list[tuple[np.ndarray, np.ndarray] | None] = field(default_factory=list)
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None
    return_logprobs: bool = False
    # New sequences only: cached KV of the prompt's first chunks, each [L, 2, chunk, Hkv, D]
    prefix_chunks: tuple[np.ndarray, ...] = ()

    @property
    def cost(self) -> int:
        """Tokens this item adds to a batched forward."""
        return self.num_fed + len(self.tree_tokens) + 1


@dataclass(frozen=True)
class VerifyResult:
    tokens: list[int]  # accepted draft tokens, then one recovered or bonus token
    num_accepted_draft_tokens: int
    logprobs: list[float]
    num_cached_tokens: int


@dataclass
class _Prepared:
    item: VerifyItem
    new_tokens: list[int]
    tree: TreeBuffers | None
    num_cached: int  # committed positions before this step (the state to roll back to)
    draft: torch.Tensor | None = None  # [1 + n, vocab] dense draft distributions (sampling)


_NO_TREE = compile_tree([], [])  # a target-only step's (empty) tree; never modified


class VerifyEngine(SequenceEngine):
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(),
                 max_tree_nodes: int = MAX_TREE_NODES):
        super().__init__(loaded, config)
        self.max_tree_nodes = min(max_tree_nodes, MAX_TREE_NODES)

    # -- one batch -------------------------------------------------------------------------
    def verify_batch(self, items: list[VerifyItem]) -> list[VerifyResult | Exception]:
        """Verify every item in one target forward; each failure is confined to its item.

        Every check that can fail for one item runs before the forward; an item whose
        acceptance fails after it is rolled back (nothing committed) and fails alone."""
        results, ready = self.prepare_each(items, self._prepare_and_reserve)
        if not ready:
            return results  # type: ignore[return-value]
        try:
            outs = self.runner.forward([
                ForwardItem(p.item.seq_id, p.new_tokens, p.tree) for _, p in ready])
        except Exception as exc:  # noqa: BLE001 - nothing was committed for any item
            log.exception("verify forward failed")
            for i, prep in ready:
                self._roll_back(prep)
                results[i] = exc
            return results  # type: ignore[return-value]
        # every row's argmax in one op and one device-to-host copy (on a GPU: one sync a batch)
        argmax = torch.cat([out.logits for out in outs]).argmax(-1).cpu()  # [sum rows]
        start = 0
        for (i, prep), out in zip(ready, outs):
            rows, start = argmax[start:start + out.logits.shape[0]], start + out.logits.shape[0]
            try:
                results[i] = self._accept(prep, out.logits, rows)
            except Exception as exc:  # noqa: BLE001 - confined to this item
                log.exception("acceptance failed for %s", prep.item.seq_id)
                self._roll_back(prep)
                results[i] = exc
        return results  # type: ignore[return-value]

    def _prepare_and_reserve(self, item: VerifyItem, batch_ids: set[str]) -> _Prepared:
        prep = self._prepare(item, batch_ids)
        self._reserve(prep, batch_ids)
        return prep

    def _roll_back(self, prep: _Prepared) -> None:
        """Forget this step's KV: the sequence is as before the request."""
        seq_id = prep.item.seq_id
        if seq_id in self.kv:
            self.kv.truncate(seq_id, min(prep.num_cached, self.kv.num_tokens(seq_id)))

    def _prepare(self, item: VerifyItem, keep: set[str]) -> _Prepared:
        if len(item.tree_tokens) > self.max_tree_nodes:
            raise InvalidRequest("tree.tokens", f"{len(item.tree_tokens)} nodes; at most "
                                 f"{self.max_tree_nodes} per request")
        if item.draft_dists and not item.tree_tokens:
            raise InvalidRequest("draft_dists", "given without a tree")
        step = self.sequences.sync(item.seq_id, item.num_cached_tokens, item.new_tokens)
        tree, draft = None, None
        if item.tree_tokens or item.tree_parents:
            self.sequences.check_tokens(item.tree_tokens, "tree.tokens")
            try:
                tree = compile_tree(item.tree_tokens, item.tree_parents)
            except ValueError as exc:
                raise InvalidRequest("tree.parents", str(exc)) from exc
            if not item.sampling.greedy:
                if len(item.draft_dists) != tree.num_nodes + 1:
                    raise InvalidRequest("draft_dists", f"sampling needs {tree.num_nodes + 1} "
                                         f"distributions (root + one per node), got "
                                         f"{len(item.draft_dists)}")
                draft = _dense_draft(item.draft_dists, tree.num_nodes + 1,
                                     self.loaded.config.vocab_size)
        depth = 0 if tree is None else int(tree.depths.max()) + 1
        if step.num_cached + len(step.new_tokens) + depth + 1 > self.sequences.max_context:
            raise InvalidRequest("tree.tokens", "the tree would run past the context length")
        num_cached = step.num_cached
        step = seed_prefix(self.sequences, step, item.prefix_chunks, keep)
        return _Prepared(item, step.new_tokens, tree, num_cached, draft)

    def _reserve(self, prep: _Prepared, keep: set[str]) -> None:
        num_tree = prep.tree.num_nodes if prep.tree is not None else 0
        need = self.kv.num_tokens(prep.item.seq_id) + len(prep.new_tokens) + num_tree
        no_room = self.sequences.reserve(prep.item.seq_id, need, keep)
        if no_room is not None:
            raise CapacityExhausted(f"KV cache full: {no_room.needed} blocks needed, "
                                    f"{no_room.free} free")

    def _accept(self, prep: _Prepared, logits: torch.Tensor,
                argmax: torch.Tensor) -> VerifyResult:
        """logits [1 + n, vocab]: row 0 after the last causal token, row i + 1 after node i;
        argmax [1 + n] their argmax, on the CPU."""
        item, tree = prep.item, prep.tree
        tree = tree if tree is not None else _NO_TREE
        if item.sampling.greedy:
            acc = greedy_accept(tree, argmax)
            probs = torch.log_softmax(logits, -1) if item.return_logprobs else None
        else:
            logits = logits.cpu()  # a GPU's rows: the request's generator lives on the CPU
            probs = warp_logits_to_probs(logits, item.sampling)  # [1 + n, vocab]
            draft = prep.draft if prep.draft is not None else torch.zeros(1, logits.shape[-1])
            gen = round_generator(item.seed, self.kv.num_tokens(item.seq_id), "verify")
            acc = tree_rejection_sample(tree, probs, draft, gen)
            probs = probs.clamp_min(1e-30).log() if item.return_logprobs else None
        self.runner.commit_tree_path(item.seq_id, acc.accepted_nodes)
        accepted = [int(tree.tokens[n]) for n in acc.accepted_nodes]
        self.sequences.commit(item.seq_id, prep.new_tokens + accepted)
        tokens = accepted + [acc.next_token]
        logprobs = _path_logprobs(probs, acc, tokens) if probs is not None else []
        return VerifyResult(tokens, len(accepted), logprobs, self.kv.num_tokens(item.seq_id))


def _path_logprobs(logp: torch.Tensor, acc: Acceptance, tokens: list[int]) -> list[float]:
    """Target log-probability of each returned token, read at its parent's row."""
    rows = [0] + [n + 1 for n in acc.accepted_nodes]
    return [float(logp[r, t]) for r, t in zip(rows, tokens)]


def _dense_draft(dists, num_rows: int, vocab: int) -> torch.Tensor:
    """Sparse fp16 draft distributions -> [num_rows, vocab] float32, each row renormalised."""
    out = torch.zeros(num_rows, vocab, dtype=torch.float32)
    for r, d in enumerate(dists):
        if d is None or len(d[0]) == 0:
            continue
        ids = torch.from_numpy(np.asarray(d[0], dtype=np.int64))
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InvalidRequest(f"draft_dists[{r}].token_ids", f"outside [0, {vocab})")
        p = torch.from_numpy(np.asarray(d[1], dtype=np.float16).astype(np.float32))
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise InvalidRequest(f"draft_dists[{r}].probs_f16", "not a distribution")
        out[r, ids] = p / p.sum()
    return out

