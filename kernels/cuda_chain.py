"""Greedy draft chains on a GPU: every depth in one CUDA graph (the GPU twin of `cpu_chain`).

    chain = CudaChain.build(loaded, graphs)   # None off CUDA / without graphs
    tokens = chain.run(kv, seq_ids, first_tokens, steps)   # [B][steps] next chain nodes

A greedy chain feeds each depth's argmax back as the next 1-row forward. Captured per (padded
batch, steps), the graph runs all the depths with the metadata of each computed on the device
from the sequences' start positions (position p: KV slot from the block table, attends to
[0, p]), and the argmax feeding the next depth, so the host uploads one staging buffer, replays
once and reads the [B, steps] tokens back once. Padding rows are sequences on the scratch
blocks of `kernels.cuda_graphs`. Sampled chains (`run_sampled`) draw each depth on the device
(`kernels.device_sampling`) from exponentials drawn beforehand with each request's generator,
and read the distributions back with the tokens.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from specmesh.kernels.attention_metadata import MASK_WORDS, AttentionMetadata
from specmesh.kernels.cpu_chain import ChainDraws
from specmesh.kernels.cuda_graphs import CudaGraphs
from specmesh.kernels.device_sampling import sample_rows
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import LoadedModel

BATCHES = (1, 2, 4, 8, 16, 32)
MAX_STEPS = 16
SAMPLED_MAX_BYTES = 64 << 20  # a sampled chain's staged exponentials


@dataclass
class _ChainGraph:
    batch: int  # padded sequences
    steps: int
    staging: torch.Tensor  # [batch * (2 + width)] int64: tokens | starts | block tables
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None  # [batch, steps] int64, written by each replay
    # sampled chains: [batch * steps * vocab] exponentials | temperature | tail | top_k [batch]
    draws: torch.Tensor | None = None  # float64
    q: torch.Tensor | None = None  # [batch, steps, vocab] float32, written by each replay


class CudaChain:
    samples = True  # sampled chains too, all depths in one graph (`run_sampled`)

    def __init__(self, loaded: LoadedModel, graphs: CudaGraphs):
        self.loaded, self.graphs = loaded, graphs
        self.kv: PagedKVCache = graphs.kv
        self.width = graphs.width
        self.chains: dict[tuple[int, int, bool], _ChainGraph] = {}
        self.vocab = loaded.config.vocab_size

    @classmethod
    def build(cls, loaded: LoadedModel, graphs: CudaGraphs | None) -> "CudaChain | None":
        return cls(loaded, graphs) if graphs is not None else None

    def fits(self, kv: PagedKVCache, seq_ids: list[str], steps: int) -> bool:
        """Small enough to capture; every fed position inside the rotary table and the
        sequence's reserved blocks."""
        if kv is not self.kv or len(seq_ids) > BATCHES[-1] or not 0 < steps <= MAX_STEPS:
            return False
        for s in seq_ids:
            table, last = kv.block_table(s), kv.num_tokens(s) + steps
            if len(table) > self.width or last > self.graphs.max_positions \
                    or last > len(table) * kv.block_size:
                return False
        return True

    def samples_in_one_call(self, num_rows: int, steps: int) -> bool:
        """The chain's exponentials (float64, one per row, depth and token) stay under
        SAMPLED_MAX_BYTES; past that the depths run one (graphed) forward each."""
        batch = BATCHES[bisect.bisect_left(BATCHES, num_rows)] if num_rows <= BATCHES[-1] else 0
        return 0 < batch * steps * self.vocab * 8 <= SAMPLED_MAX_BYTES

    def run(self, kv: PagedKVCache, seq_ids: list[str], first: list[int], steps: int,
            choose=None) -> list[list[int]]:
        """Feed first[b] at the end of sequence b's KV, then `steps` depths of argmax; returns
        each sequence's `steps` next tokens; each sequence's num_tokens grows by `steps`."""
        if choose is not None:
            raise ValueError("CudaChain draws sampled chains with run_sampled")
        return self._run(kv, seq_ids, first, steps, None)[0]

    def run_sampled(self, kv: PagedKVCache, seq_ids: list[str], first: list[int], steps: int,
                    draws: ChainDraws) -> tuple[list[list[int]], torch.Tensor]:
        """As `run`, each row choosing as `draws` says (greedy rows the argmax); returns the
        tokens and q [B, steps, vocab] float32 on the CPU, each sampled draw's distribution."""
        return self._run(kv, seq_ids, first, steps, draws)

    def _run(self, kv, seq_ids, first, steps, draws: ChainDraws | None):
        b = len(seq_ids)
        batch = BATCHES[bisect.bisect_left(BATCHES, b)]
        key = (batch, steps, draws is not None)
        chain = self.chains.get(key) or self._capture(*key)
        starts = [kv.num_tokens(s) for s in seq_ids]
        self._upload(chain, first, starts, [kv.block_table(s) for s in seq_ids], draws)
        if chain.graph is not None:
            chain.graph.replay()
            out, q = chain.out, chain.q
        else:  # off a GPU (tests): the same work, eagerly
            out, q = self._forward(chain)
        tokens = out[:b].tolist()  # [B][steps]
        q = q[:b].cpu() if q is not None else None  # [B, steps, vocab]
        for s, n in zip(seq_ids, starts):
            kv.set_num_tokens(s, n + steps)
            kv.touch(s)
        return tokens, q

    def _upload(self, chain: _ChainGraph, first: list[int], starts: list[int],
                tables: list[list[int]], draws: ChainDraws | None = None) -> None:
        """tokens | starts | tables of the real rows, then padding rows on the scratch
        blocks (start 0); one host-to-device copy."""
        g, batch, width = self.graphs, chain.batch, self.width
        pad = batch - len(first)
        scratch = g.scratch_blocks[:width]
        host = torch.zeros(batch * (2 + width), dtype=torch.int64)
        host[:len(first)] = torch.tensor(first, dtype=torch.int64)
        host[batch:batch + len(starts)] = torch.tensor(starts, dtype=torch.int64)
        view = host[2 * batch:].view(batch, width)  # [batch, W]
        for row, table in enumerate(tables + [scratch] * pad):
            view[row, :len(table)] = torch.tensor(table, dtype=torch.int64)
        chain.staging.copy_(host)  # pageable: synchronous, so `host` may go
        if chain.draws is not None:  # padding rows: greedy (temperature 0)
            n, b = batch * chain.steps * self.vocab, len(first)
            values = torch.zeros(n + 3 * batch, dtype=torch.float64)
            if draws is not None:
                temperature, tail, top_k = draws.tensors()
                values[:b * chain.steps * self.vocab] = draws.expo.reshape(-1)
                for i, column in enumerate((temperature, tail, top_k)):
                    values[n + i * batch:n + i * batch + b] = column.double()
            chain.draws.copy_(values)

    def _capture(self, batch: int, steps: int, sampled: bool = False) -> _ChainGraph:
        device = self.loaded.device
        chain = _ChainGraph(batch, steps, torch.zeros(batch * (2 + self.width),
                                                      dtype=torch.int64, device=device))
        if sampled:
            chain.draws = torch.zeros(batch * steps * self.vocab + 3 * batch,
                                      dtype=torch.float64, device=device)
        scratch = [self.graphs.scratch_blocks[:self.width]]
        self._upload(chain, [0] * batch, [0] * batch, scratch * batch)  # all padding
        self.chains[(batch, steps, sampled)] = chain
        if not self.graphs.on_gpu:
            return chain
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(chain)
        torch.cuda.current_stream().wait_stream(side)
        chain.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(chain.graph, pool=self.graphs.pool,
                              capture_error_mode="thread_local"):
            chain.out, chain.q = self._forward(chain)
        return chain

    @torch.inference_mode()
    def _forward(self, chain: _ChainGraph) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All depths: each row's token at its next position, the argmax (or, sampled, the
        row's draw) fed back. Returns tokens [batch, steps] int64 and, sampled, q [batch,
        steps, vocab] float32 (else None)."""
        batch, width, bs = chain.batch, self.width, self.kv.block_size
        x, device = chain.staging, chain.staging.device
        tokens, starts = x[:batch], x[batch:2 * batch]  # [batch] each
        tables = x[2 * batch:].view(batch, width)  # [batch, W] int64
        rows = torch.arange(batch, device=device)  # [batch]
        meta_fixed = dict(block_tables=tables.to(torch.int32),
                          cu_q_lens=torch.arange(batch + 1, device=device, dtype=torch.int32),
                          q_seq_idx=rows,
                          tree_masks=torch.zeros(batch, MASK_WORDS, dtype=torch.int64,
                                                 device=device),
                          block_size=bs, max_seq_len=width * bs)
        out, qs = [], []
        if chain.draws is not None:
            n = batch * chain.steps * self.vocab
            expo = chain.draws[:n].view(batch, chain.steps, self.vocab)
            temperature, tail, top_k = chain.draws[n:].view(3, batch)
            temperature, tail, top_k = temperature.float(), tail.float(), top_k.long()
        for depth in range(chain.steps):
            pos = starts + depth  # [batch]
            lens = (pos + 1).to(torch.int32)  # sees [0, pos]; no tree
            slots = tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs  # [batch]
            meta = AttentionMetadata(seq_lens=lens, q_prefix_lens=lens, tree_starts=lens,
                                     slot_mapping=slots, **meta_fixed)
            logits = self.loaded.model(tokens, pos, meta, self.kv.k, self.kv.v, rows,
                                       positions_checked=True)  # [batch, vocab]
            if chain.draws is None:
                tokens = logits.argmax(-1)  # [batch]
            else:
                tokens, q = sample_rows(logits, expo[:, depth], temperature, tail, top_k)
                qs.append(q)
            out.append(tokens)
        q = torch.stack(qs, 1) if qs else None  # [batch, steps, vocab]
        return torch.stack(out, 1), q  # [batch, steps]
