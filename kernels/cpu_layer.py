"""Decoder layers in one C call each (`csrc/layer_f16.c`) where every piece has a CPU kernel.

The layer-by-op path runs ~25 PyTorch ops per layer around the four projections and the
attention (norms, bias, rotary, KV store, residuals, SiLU): ~5-10 us each, which on a small
draft model costs more than its weights take to stream. When a model serves all four
projections from fp16 or int8 (`kernels.linear.attach_f16` / `attach_q8`), its attention and norms fit the CPU
kernels and the KV cache is fp32, `FusedLayers` runs each layer as one call over the same
kernels, in the same order, with the glue in C:

    fused = FusedLayers.build(model)          # None where it cannot run (or disagrees)
    x = fused.run(x, cos, sin, meta, k_pool, v_pool)   # instead of the layer loop

Checked at build against the layer-by-op path on the model's own first layer (a tree and a
plain sequence, scattered blocks); any disagreement and the model keeps the op path, as it
does with `SPECMESH_CPU_LAYER=0` (for A/B runs).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from specmesh.kernels import cpu_attention, cpu_build, cpu_norm
from specmesh.kernels.attention_metadata import MAX_TREE_NODES, AttentionMetadata

log = logging.getLogger(__name__)

_P = ctypes.c_void_p


class _Weights(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("qkv_w", "o_w", "gate_up_w", "down_w", "qkv_s", "o_s",
                                        "gate_up_s", "down_s", "qkv_b", "o_b", "ln1", "ln2")
                ] + [("stream", ctypes.c_int)]


def _served(p) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A projection's kernel weight and its int8 row scales (None: fp16), or None."""
    if p is None:
        return None
    if getattr(p, "weight_q8", None) is not None:
        return p.weight_q8, p.weight_scale
    if getattr(p, "weight_f16", None) is not None:
        return p.weight_f16, None
    return None


_INTS = ("T", "hidden", "ffn", "H", "Hkv", "D", "threads", "attn_threads", "block_size",
         "max_blocks", "max_visible")
_PTRS = ("cos", "sin", "slots", "block_tables", "q_prefix_lens", "tree_starts", "q_seq_idx",
         "tree_masks", "xn", "qkv", "q", "attn", "h", "gu", "act")


class _Forward(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int) for n in _INTS] + [("eps", ctypes.c_float),
                                                      ("scale", ctypes.c_float)]
                + [(n, _P) for n in _PTRS])


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("layer_f16.c", ("-fno-math-errno", "-ffp-contract=off"))
    if lib is None:
        return None
    fn = lib.specmesh_layer_f16
    fn.argtypes = [_P, ctypes.POINTER(_Weights), ctypes.POINTER(_Forward), _P, _P]
    fn.restype = ctypes.c_int
    many = lib.specmesh_layers_f16
    many.argtypes = [_P, ctypes.POINTER(_Weights), ctypes.c_int, ctypes.c_int,
                     ctypes.POINTER(_Forward), _P, _P, ctypes.c_int64]
    many.restype = ctypes.c_int
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _layer_weights(layer) -> tuple[_Weights, tuple] | None:
    """The C view of one DecoderLayer (and the tensors it points into), or None if a piece
    has no kernel."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    served = [_served(p) for p in projections]
    if any(s is None for s in served):
        return None
    norms = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
    if any(n.dtype != torch.float32 or not n.is_contiguous() for n in norms):
        return None
    biases = tuple(None if p.bias is None else p.bias.detach().float().contiguous()
                   for p in (attn.qkv_proj, attn.o_proj))
    keep = tuple(t for pair in served for t in pair if t is not None) + norms + biases
    w = _Weights(*(_ptr(w) for w, _ in served), *(_ptr(s) for _, s in served),
                 *(_ptr(b) for b in biases), *(_ptr(n) for n in norms),
                 int(any(getattr(p, "stream_weights", False) for p in projections)))
    return w, keep


class FusedLayers:
    """Every decoder layer of one model as a C call; see the module docstring."""

    def __init__(self, model, weights: list[_Weights], keep: list[tuple]):
        cfg = model.config
        self.hidden, self.ffn = cfg.hidden_size, cfg.intermediate_size
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps, self.scale = cfg.rms_norm_eps, model.model.layers[0].self_attn.scale
        self._weights, self._keep = weights, keep
        self.array = (_Weights * len(weights))(*weights)  # every layer, for one C call
        self._fn = _library().specmesh_layers_f16

    @classmethod
    def build(cls, model) -> "FusedLayers | None":
        cfg = model.config
        if os.environ.get("SPECMESH_CPU_LAYER", "1") == "0":  # A/B: the layer-by-op path
            return None
        if (_library() is None or cfg.head_dim % 16 or cfg.head_dim > cpu_attention.MAX_HEAD_DIM
                or cfg.hidden_size % 16 or cfg.num_heads % cfg.num_kv_heads
                or not cpu_norm.available() or model.rope is None):
            return None
        views = [_layer_weights(layer) for layer in model.model.layers]
        if any(v is None for v in views):
            return None
        fused = cls(model, [v[0] for v in views], [v[1] for v in views])
        return fused if fused._agrees(model) else None

    def fits(self, x: torch.Tensor, k_pool: torch.Tensor) -> bool:
        return (x.dtype == k_pool.dtype == torch.float32 and x.device.type == "cpu"
                and k_pool.is_contiguous() and x.dim() == 2)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            meta: AttentionMetadata, k_pool: torch.Tensor, v_pool: torch.Tensor,
            layers: range | None = None) -> torch.Tensor:
        """x [T, hidden] through the layers (all by default); returns the new x."""
        x = x.contiguous().clone()  # updated in place by the kernel
        fwd, keep = self._forward(x.shape[0], cos, sin, meta, k_pool)
        layers = layers if layers is not None else range(len(self._weights))
        assert layers.step == 1 and 0 <= layers.start and layers.stop <= len(self._weights)
        rc = self._fn(x.data_ptr(), self.array, layers.start, len(layers), ctypes.byref(fwd),
                      k_pool.data_ptr(), v_pool.data_ptr(), k_pool[0].numel())
        if rc != 0:
            raise MemoryError("tree-attention scratch allocation failed")
        del keep  # the metadata and scratch the kernel read, alive until here
        return x

    def _forward(self, num_tokens: int, cos, sin, meta: AttentionMetadata,
                 k_pool: torch.Tensor) -> tuple[_Forward, tuple]:
        """The per-forward arguments shared by every layer, and the tensors they point into."""
        t, d, h, kv = num_tokens, self.head_dim, self.heads, self.kv_heads
        sizes = (t * self.hidden, t * (h + 2 * kv) * d, t * h * d, t * h * d, t * self.hidden,
                 t * 2 * self.ffn, t * self.ffn)  # xn, qkv, q, attn, h, gu, act
        scratch = torch.empty(sum(sizes), dtype=torch.float32)
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        tables, seq_idx, prefix, starts, masks = cpu_attention.kernel_metadata(meta)
        cos, sin = cos.contiguous(), sin.contiguous()  # [T, D] each
        slots = meta.slot_mapping.to(torch.int64).contiguous()  # [T]
        threads = torch.get_num_threads()
        work = t * h * meta.max_seq_len
        fwd = _Forward(t, self.hidden, self.ffn, h, kv, d, threads,
                       1 if work < 1 << 12 else min(t * h, threads),
                       k_pool.shape[2], tables.shape[1], meta.max_seq_len + MAX_TREE_NODES,
                       self.eps, self.scale, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                       tables.data_ptr(), prefix.data_ptr(), starts.data_ptr(),
                       seq_idx.data_ptr(), masks.data_ptr(),
                       *(scratch.data_ptr() + 4 * o for o in offsets))
        return fwd, (scratch, cos, sin, slots, tables, seq_idx, prefix, starts, masks)

    def _agrees(self, model) -> bool:
        """The model's first layer, fused vs layer by layer, on a small packed batch."""
        from specmesh.kernels.attention_metadata import SequenceStep, build_metadata

        gen = torch.Generator().manual_seed(0)
        cfg = model.config
        shape = (1, 9, 4, cfg.num_kv_heads, cfg.head_dim)  # [layers, blocks, bs, Hkv, D]
        k_pool, v_pool = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
        ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
        meta = build_metadata([SequenceStep([3, 0, 7], 6, 2, ancestors),
                               SequenceStep([5, 1], 5, 1)], block_size=4)
        x = torch.randn(meta.num_tokens, cfg.hidden_size, generator=gen)  # [T, hidden]
        positions = torch.tensor([6, 7, 8, 9, 9, 5])  # [T]
        cos, sin = model.rope.lookup(positions)
        k_ref, v_ref = k_pool.clone(), v_pool.clone()
        want = model.model.layers[0].forward(x, cos, sin, k_ref[0], v_ref[0], meta)
        got = self.run(x, cos, sin, meta, k_pool, v_pool, range(1))
        ok = (torch.allclose(got, want, rtol=1e-4, atol=1e-4)
              and torch.equal(k_pool, k_ref) and torch.equal(v_pool, v_ref))
        if not ok:
            log.warning("fused CPU layer disagrees with the layer-by-op path; not used")
        return ok
