"""CUDA graphs for the small packed forwards that speculation is made of.

A decode step, a verify of a few trees, a draft depth: on a GPU each is a few hundred small
kernel launches, and launching them from Python costs several times what the GPU spends on the
weights (a 1B-class model: ~11 ms eager vs a ~2.3 ms weight sweep). `CudaGraphs` captures the
whole model forward once per padded size (`SIZES` tokens) and replays it.

Every captured size reads one static int64 staging buffer on the device, filled by one
host-to-device copy per call:

    tokens [S] | positions [S] | logits rows [S] | slot_mapping [S] | q_prefix_lens [S]
    | q_seq_idx [S] | tree_masks [S, 2] | seq_lens [S+1] | tree_starts [S+1] | cu_q_lens [S+2]
    | block_tables [S+1, W]

and the graph itself casts the metadata to the kernel's dtypes. A batch of T < S tokens is
padded with one extra sequence of S - T causal tokens whose KV goes to scratch blocks taken out
of the cache for good (no request ever owns them); unused sequence slots are empty (no queries,
no KV). The tree-attention launch is planned for the cache's full width (W blocks), and splits
past a sequence's end do nothing, so one plan serves every length. Outputs are copied out of
the graph's buffer (the next replay of the same size overwrites it).

Falls back to the eager forward (returns None) for batches larger than the largest size,
sequences longer than the rotary table or the static block table, and batch-invariant models.
SPECMESH_CUDA_GRAPHS=0 turns graphs off.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass

import torch

from specmesh.kernels.attention_metadata import (
    MASK_WORDS,
    AttentionMetadata,
    SequenceStep,
    build_metadata,
)
from specmesh.kernels.cuda_compile import DTYPE_NAMES, HEAD_DIMS
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import LoadedModel

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def enabled() -> bool:
    return os.environ.get("SPECMESH_CUDA_GRAPHS", "1") != "0"


def staging_layout(size: int, width: int) -> dict[str, tuple[int, int]]:
    """name -> (offset, length) in the int64 staging buffer of a graph of `size` tokens over
    block tables `width` blocks wide."""
    lengths = {"tokens": size, "positions": size, "rows": size, "slot_mapping": size,
               "q_prefix_lens": size, "q_seq_idx": size, "tree_masks": size * MASK_WORDS,
               "seq_lens": size + 1, "tree_starts": size + 1, "cu_q_lens": size + 2,
               "block_tables": (size + 1) * width}
    layout, offset = {}, 0
    for name, n in lengths.items():
        layout[name] = (offset, n)
        offset += n
    return layout


def fill_staging(host: torch.Tensor, layout: dict[str, tuple[int, int]], size: int, width: int,
                 tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                 meta: AttentionMetadata) -> int:
    """Write one padded batch (exactly `size` tokens, at most size + 1 sequences, meta built
    with the padding sequence last) into `host` [total] int64, in `layout`. Returns how many
    leading entries must be uploaded: block-table rows past the batch's sequences are never
    read (those sequences have no queries and no KV; the rows hold earlier valid tables)."""
    def put(name: str, value: torch.Tensor, fill: int = 0) -> None:
        offset, n = layout[name]
        flat = value.reshape(-1)
        host[offset:offset + flat.numel()] = flat
        if flat.numel() < n:
            host[offset + flat.numel():offset + n] = fill

    put("tokens", tokens)
    put("positions", positions)
    put("rows", rows)
    put("slot_mapping", meta.slot_mapping)
    put("q_prefix_lens", meta.q_prefix_lens)
    put("q_seq_idx", meta.q_seq_idx)
    put("tree_masks", meta.tree_masks)
    put("seq_lens", meta.seq_lens)
    put("tree_starts", meta.tree_starts)
    put("cu_q_lens", meta.cu_q_lens, fill=size)  # empty sequences after the last real one
    offset, _ = layout["block_tables"]
    num_seqs, used = meta.block_tables.shape  # [B, max_blocks]
    end = offset + num_seqs * width
    tables = host[offset:end].view(num_seqs, width)  # [B, W]
    tables.zero_()  # columns past a sequence's blocks: a valid block all the same (a fallback
    tables[:, :used] = meta.block_tables  # to the PyTorch reference gathers whole rows)
    return end


@dataclass
class _Graph:
    size: int
    staging: torch.Tensor  # [total] int64 on the device: the graph's only input
    layout: dict[str, tuple[int, int]]  # staging_layout(size, width)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [size, vocab] float32, written by each replay


class CudaGraphs:
    """Captured forwards of one model over one KV cache, by padded token count."""

    def __init__(self, loaded: LoadedModel, kv: PagedKVCache, scratch_blocks: list[int],
                 width: int):
        self.loaded, self.kv = loaded, kv
        self.scratch_blocks = scratch_blocks  # the padding sequence's KV, never a request's
        self.width = width  # blocks per static block-table row
        self.max_positions = loaded.model.rope.cos.shape[0] if loaded.model.rope else 0
        # padding rows sit at positions [0, pad): no size past the rotary table
        self.sizes = [s for s in SIZES if s <= self.max_positions]
        # off a GPU (tests) nothing is captured: the same staging and padding, run eagerly
        self.on_gpu = loaded.device.type == "cuda"
        total = max(sum(n for _, n in staging_layout(s, width).values()) for s in self.sizes)
        self.host = torch.empty(total, dtype=torch.int64, pin_memory=self.on_gpu)
        self.copied: torch.cuda.Event | None = None  # the last staging upload
        self.graphs: dict[int, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.on_gpu else None

    @classmethod
    def build(cls, loaded: LoadedModel, kv: PagedKVCache) -> "CudaGraphs | None":
        """None off CUDA, when disabled, where the attention kernel does not take the model,
        or when the cache cannot spare the scratch blocks."""
        cfg = loaded.config
        if loaded.device.type != "cuda" or not enabled() or loaded.model.rope is None:
            return None
        if cfg.head_dim not in HEAD_DIMS or loaded.dtype not in DTYPE_NAMES:
            return None  # the PyTorch reference would run, and it reads lengths on the host
        need = math.ceil(SIZES[-1] / kv.block_size)
        if kv.num_free_blocks < 4 * need:
            return None
        width = math.ceil(cfg.max_position_embeddings / kv.block_size)
        return cls(loaded, kv, kv.take_scratch(need), width)

    def _applicable(self, steps: list[SequenceStep], num_tokens: int) -> int | None:
        """The padded size for this batch, or None where the eager forward must run."""
        if not self.sizes or num_tokens > self.sizes[-1] \
                or self.loaded.model.model.layers[0].self_attn.batch_invariant:
            return None
        for s in steps:
            if len(s.block_table) > self.width or s.num_cached + s.num_new > self.max_positions:
                return None
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def run(self, steps: list[SequenceStep], tokens: torch.Tensor, positions: torch.Tensor,
            rows: torch.Tensor) -> torch.Tensor | None:
        """Logits [len(rows), vocab] float32 of this batch through a graph, or None (run the
        eager forward). tokens/positions [T] and rows [M] are host int64 tensors."""
        size = self._applicable(steps, tokens.shape[0])
        if size is None:
            return None
        graph = self.graphs.get(size) or self.capture(size)
        pad = size - tokens.shape[0]
        if pad:
            steps = steps + [self._padding(pad)]
            tokens = torch.cat([tokens, torch.zeros(pad, dtype=torch.int64)])
            positions = torch.cat([positions, torch.arange(pad)])
        meta = build_metadata(steps, self.kv.block_size)
        self._upload(graph, tokens, positions, rows, meta)
        if graph.graph is not None:
            graph.graph.replay()
            logits = graph.logits
        else:
            logits = self._forward(graph)
        return logits[:rows.shape[0]].clone()

    def _padding(self, num_tokens: int) -> SequenceStep:
        """The padding sequence: `num_tokens` causal tokens on the scratch blocks."""
        blocks = self.scratch_blocks[:math.ceil(num_tokens / self.kv.block_size)]
        return SequenceStep(blocks, 0, num_tokens)

    def _upload(self, graph: _Graph, tokens, positions, rows, meta) -> None:
        if self.copied is not None:
            self.copied.synchronize()  # the pinned buffer is free again
        n = fill_staging(self.host, graph.layout, graph.size, self.width, tokens, positions, rows,
                         meta)
        graph.staging[:n].copy_(self.host[:n], non_blocking=self.on_gpu)
        if self.on_gpu:
            self.copied = torch.cuda.Event()
            self.copied.record()

    def capture_all(self) -> None:
        """Capture every size now (largest first), so no request pays for a capture."""
        for size in reversed(self.sizes):
            if size not in self.graphs:
                self.capture(size)

    def capture(self, size: int) -> _Graph:
        """Warm up and capture the forward of `size` tokens (staging holds an all-padding
        batch meanwhile: valid input whose KV goes to the scratch blocks)."""
        layout = staging_layout(size, self.width)
        total = sum(n for _, n in layout.values())
        graph = _Graph(size, torch.zeros(total, dtype=torch.int64, device=self.loaded.device),
                       layout)
        steps = [self._padding(size)]
        self._upload(graph, torch.zeros(size, dtype=torch.int64), torch.arange(size),
                     torch.arange(size), build_metadata(steps, self.kv.block_size))
        if not self.on_gpu:
            self.graphs[size] = graph
            return graph
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the attention kernel, settles the allocator
                self._forward(graph)
        torch.cuda.current_stream().wait_stream(side)
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph, pool=self.pool, capture_error_mode="thread_local"):
            graph.logits = self._forward(graph)
        self.graphs[size] = graph
        return graph

    @torch.inference_mode()
    def _forward(self, graph: _Graph) -> torch.Tensor:
        """The captured work: unpack the staging buffer, run the model. [size, vocab]"""
        size, width, x = graph.size, self.width, graph.staging
        part = {name: x[o:o + n] for name, (o, n) in graph.layout.items()}
        i32 = torch.int32
        meta = AttentionMetadata(
            block_tables=part["block_tables"].view(size + 1, width).to(i32),
            seq_lens=part["seq_lens"].to(i32),
            cu_q_lens=part["cu_q_lens"].to(i32),
            q_seq_idx=part["q_seq_idx"],
            q_prefix_lens=part["q_prefix_lens"].to(i32),
            tree_starts=part["tree_starts"].to(i32),
            tree_masks=part["tree_masks"].view(size, MASK_WORDS),
            slot_mapping=part["slot_mapping"],
            block_size=self.kv.block_size,
            max_seq_len=width * self.kv.block_size,
        )
        return self.loaded.model(part["tokens"], part["positions"], meta, self.kv.k, self.kv.v,
                                 part["rows"], positions_checked=True)
