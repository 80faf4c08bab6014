"""Draft chains through one C loop (`kernels/csrc/chain_f16.c`).

    chain = ChainRunner.build(loaded.model)   # None where the C path cannot run
    tokens = chain.run(kv, seq_ids, first_tokens, steps)   # [B][steps] next chain nodes

A greedy chain feeds each depth's argmax back as the next 1-row forward; the C loop does that
with the fused decoder layers, the norm, the LM head and the argmax, so no Python runs between
the depths. A sampled chain runs one C call per depth and draws its token in Python from the
logits (`choose`), with the request's own generator. Each depth computes what
`ModelRunner.forward` computes (same kernels, same order): the draft engine uses it for chains
where it is available and falls back to the Python path otherwise. `SPECMESH_CPU_CHAIN=0`
turns it off (A/B).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specmesh.kernels import cpu_build, cpu_layer, cpu_norm
from specmesh.kernels.kv_cache import PagedKVCache

_P = ctypes.c_void_p


class _Chain(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int) for n in ("B", "steps", "vocab", "layers", "max_rope",
                                             "lm_stream")]
                + [("layer_floats", ctypes.c_int64)]
                + [(n, _P) for n in ("embed", "norm_w", "lm_head", "rope_cos", "rope_sin",
                                     "weights", "tokens", "positions", "out", "x", "logits",
                                     "expo", "temperature", "top_p_tail", "top_k", "q_out",
                                     "scores", "order", "logits_out")])

SAMPLED_MAX_VOCAB = 16384  # past this one thread's sort per depth costs more than torch's


@dataclass
class ChainDraws:
    """How each row of a chain run chooses its tokens when some rows sample (`run_sampled`)."""

    temperature: list[float]  # per row; 0 = greedy (argmax)
    top_p: list[float]
    top_k: list[int]
    expo: torch.Tensor  # [B, steps, vocab] float64: each sampled row's exponentials, in draw
    # order from its generator (what `sample_without_replacement` would draw depth by depth)
    q_out: torch.Tensor | None = None  # [B, steps, vocab] float32, filled by the run

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(temperature [B] f32, top-p tail [B] f32, top_k [B] i32): the C struct's arrays."""
        tail = [float(1.0 - p) if p < 1.0 else 0.0 for p in self.top_p]
        return (torch.tensor(self.temperature, dtype=torch.float32),
                torch.tensor(tail, dtype=torch.float32),
                torch.tensor(self.top_k, dtype=torch.int32))


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("chain_f16.c", ("-fno-math-errno", "-ffp-contract=off"))
    if lib is None:
        return None
    fn = lib.specmesh_chain_f16
    fn.argtypes = [ctypes.POINTER(_Chain), ctypes.POINTER(cpu_layer._Forward), _P, _P]
    fn.restype = ctypes.c_int
    return lib


class ChainRunner:
    """One model's chain loop; see the module docstring."""

    samples = True  # sampled chains too (one C call per depth, `choose` draws)

    def __init__(self, model, fused: cpu_layer.FusedLayers):
        self.model, self.fused = model, fused
        self.layer_array = fused.array  # the fused layers' own C array
        self._fn = _library().specmesh_chain_f16

    @classmethod
    def build(cls, model) -> "ChainRunner | None":
        if os.environ.get("SPECMESH_CPU_CHAIN", "1") == "0" or _library() is None:
            return None
        fused, head = model.fused_layers, model.lm_head
        embed = model.model.embed_tokens.weight
        if (fused is None or getattr(head, "weight_f16", None) is None or head.bias is not None
                or embed.dtype != torch.float32 or not embed.is_contiguous()
                or not cpu_norm.fits(embed[:1], model.model.norm.weight)):
            return None
        return cls(model, fused)

    def fits(self, kv: PagedKVCache, seq_ids: list[str], steps: int) -> bool:
        """The model still runs fused (not batch-invariant, say) and the rope table covers
        every position the chains will feed."""
        last = max(kv.num_tokens(s) for s in seq_ids) + steps
        return self.model.fused_layers is self.fused and last <= self.model.rope.cos.shape[0]

    def run_sampled(self, kv: PagedKVCache, seq_ids: list[str], first: list[int], steps: int,
                    draws: ChainDraws, logits_out: torch.Tensor | None = None
                    ) -> tuple[list[list[int]], torch.Tensor]:
        """As `run`, all depths in one C call, each row choosing as `draws` says: greedy rows
        the argmax, sampled rows a draw from their warped, fp16-rounded distribution. Returns
        the tokens and q [B, steps, vocab] float32, the distribution of each sampled draw
        (zeros on greedy rows)."""
        q = torch.zeros(len(seq_ids), steps, self.model.config.vocab_size)
        draws.q_out = q
        return self.run(kv, seq_ids, first, steps, draws=draws, logits_out=logits_out), q

    def samples_in_one_call(self, num_rows: int, steps: int) -> bool:
        """`run_sampled` serves this model's vocabulary (SPECMESH_CPU_CHAIN_SAMPLED=0: no,
        for A/B; sampled chains then run one C call per depth)."""
        return (self.model.config.vocab_size <= SAMPLED_MAX_VOCAB
                and os.environ.get("SPECMESH_CPU_CHAIN_SAMPLED", "1") != "0")

    @staticmethod
    def _sampled_args(draws: ChainDraws | None, b: int, steps: int, vocab: int) -> list:
        """The C struct's sampling arrays (all None: greedy)."""
        if draws is None:
            return [None] * 7
        assert tuple(draws.expo.shape) == (b, steps, vocab) and draws.expo.dtype == torch.float64
        temperature, tail, top_k = draws.tensors()
        return [draws.expo.contiguous(), temperature, tail, top_k, draws.q_out,
                torch.empty(vocab), torch.empty(vocab, dtype=torch.int32)]

    def run(self, kv: PagedKVCache, seq_ids: list[str], first: list[int], steps: int,
            choose: Callable[[torch.Tensor], list[int]] | None = None,
            draws: ChainDraws | None = None,
            logits_out: torch.Tensor | None = None) -> list[list[int]]:
        """Feed first[b] at the end of sequence b's KV, then `steps` depths; returns each
        sequence's `steps` next tokens. Greedy (`choose` None): the argmax of each depth's
        logits, all depths in one C call. Else `choose(logits [B, vocab]) -> B tokens` picks
        them (sampling), one C call per depth. The KV of the fed tokens is written (each
        sequence's num_tokens grows by `steps`), as `ModelRunner.forward` would. `logits_out`
        [B, steps, vocab] float32 (all depths in one call only): each depth's logits."""
        m, f = self.model, self.fused
        b, vocab = len(seq_ids), m.config.vocab_size
        tables = [kv.block_table(s) for s in seq_ids]
        block_tables = torch.zeros(b, max(map(len, tables)), dtype=torch.int32)  # [B, max_blocks]
        for i, t in enumerate(tables):
            block_tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        start = [kv.num_tokens(s) for s in seq_ids]
        tokens = torch.tensor(first, dtype=torch.int64)  # [B]
        positions = torch.tensor(start, dtype=torch.int32)  # [B]
        per_call = steps if choose is None else 1
        out = torch.empty(b, per_call, dtype=torch.int64)  # [B, per_call]
        x = torch.empty(b, f.hidden)  # [B, hidden]
        logits = torch.empty(b, vocab)  # [B, vocab]
        fwd, keep = self._forward(b, block_tables, kv)
        head = m.lm_head
        if logits_out is not None:
            assert choose is None and tuple(logits_out.shape) == (b, steps, vocab)
            assert logits_out.dtype == torch.float32 and logits_out.is_contiguous()
        sampled = self._sampled_args(draws, b, steps, vocab) + [logits_out]
        chain = _Chain(b, per_call, vocab, len(f._weights), m.rope.cos.shape[0],
                       int(getattr(head, "stream_weights", False)), kv.k[0].numel(),
                       m.model.embed_tokens.weight.data_ptr(), m.model.norm.weight.data_ptr(),
                       head.weight_f16.data_ptr(), m.rope.cos.data_ptr(), m.rope.sin.data_ptr(),
                       ctypes.addressof(self.layer_array), tokens.data_ptr(),
                       positions.data_ptr(), out.data_ptr(), x.data_ptr(), logits.data_ptr(),
                       *[t.data_ptr() if t is not None else None for t in sampled])
        chosen: list[list[int]] = [[] for _ in range(b)]
        for _ in range(steps // per_call):
            self._call(chain, fwd, kv)
            if choose is None:
                chosen = out.tolist()
                continue
            picked = choose(logits)
            tokens.copy_(torch.tensor(picked, dtype=torch.int64))
            for row, tok in zip(chosen, picked):
                row.append(int(tok))
        del keep
        for s, n in zip(seq_ids, start):
            kv.set_num_tokens(s, n + steps)
            kv.touch(s)
        return chosen

    def _call(self, chain: _Chain, fwd, kv: PagedKVCache) -> None:
        rc = self._fn(ctypes.byref(chain), ctypes.byref(fwd), kv.k.data_ptr(), kv.v.data_ptr())
        if rc == -2:
            raise ValueError("chain runs past the rope table (max_position_embeddings)")
        if rc != 0:
            raise MemoryError("tree-attention scratch allocation failed")

    def _forward(self, b: int, block_tables: torch.Tensor, kv: PagedKVCache):
        """The layers' per-forward arguments for B causal rows; the C loop fills the metadata
        and rope rows at each depth."""
        f = self.fused
        d, h, hkv = f.head_dim, f.heads, f.kv_heads
        sizes = (b * f.hidden, b * (h + 2 * hkv) * d, b * h * d, b * h * d, b * f.hidden,
                 b * 2 * f.ffn, b * f.ffn, 2 * b * d)  # xn, qkv, q, attn, h, gu, act, cos+sin
        scratch = torch.empty(sum(sizes), dtype=torch.float32)
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        ptrs = [scratch.data_ptr() + 4 * o for o in offsets]
        ints = torch.zeros(6 * b + 2 * b, dtype=torch.int64)  # slots, seq_idx, masks[B, 2], ...
        slots, seq_idx, masks = ints[:b], ints[b:2 * b], ints[2 * b:4 * b]
        small = torch.zeros(2 * b, dtype=torch.int32)  # prefix, starts
        fwd = cpu_layer._Forward(
            b, f.hidden, f.ffn, h, hkv, d, torch.get_num_threads(), 1, kv.block_size,
            block_tables.shape[1], 0, f.eps, f.scale, ptrs[7], ptrs[7] + 4 * b * d,
            slots.data_ptr(), block_tables.data_ptr(), small.data_ptr(),
            small.data_ptr() + 4 * b, seq_idx.data_ptr(), masks.data_ptr(), *ptrs[:7])
        return fwd, (scratch, ints, small, block_tables)
