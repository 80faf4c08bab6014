"""A Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, TinyStories) over a paged KV cache.

Parameter names map one to one onto Hugging Face checkpoint keys, so `load_state_dict` takes a
`model.safetensors` as it is. The forward pass is packed (varlen): the tokens of many sequences,
each with its own committed prefix and optional draft tree, run as one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specmesh.kernels import cpu_layer, cpu_norm, weight_arena
from specmesh.kernels.attention_metadata import AttentionMetadata
from specmesh.kernels.config import ModelConfig
from specmesh.kernels.invariant import attention_per_query
from specmesh.kernels.linear import attach_f16, attach_q8, pack_linear, project
from specmesh.kernels.tree_attention import tree_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_kernel: bool | None = None  # decided at the first call (`kernels.cpu_norm`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, dim]
        if self.use_kernel is None:
            self.use_kernel = cpu_norm.fits(x, self.weight)
        if self.use_kernel and x.dtype == torch.float32 and x.dim() == 2:
            return cpu_norm.rms_norm(x, self.weight, self.eps)  # one call, rows independent
        if x.dtype == torch.float32 or x.is_cuda:  # one op; HF's formula below up to rounding
            # (on a GPU in 16 bits: fp32 math rounded once, where HF rounds before the weight)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[T] positions -> cos, sin [T, head_dim] (rotate-half layout, fp32 math as in HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTable:
    """cos/sin rows for positions [0, max_positions), computed once (as `rope_cos_sin` would)."""

    def __init__(self, max_positions: int, head_dim: int, theta: float, dtype: torch.dtype,
                 device: torch.device):
        self.head_dim, self.theta = head_dim, theta
        positions = torch.arange(max_positions, device=device)
        self.cos, self.sin = rope_cos_sin(positions, head_dim, theta, dtype)  # [P, D] each

    def lookup(self, positions: torch.Tensor,
               checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin [T, D]; positions past the table are computed directly
        (`checked`: the caller knows they are all inside it; no device-to-host read)."""
        if not checked and positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            return rope_cos_sin(positions, self.head_dim, self.theta, self.cos.dtype)
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, heads, D]
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=o_bias)
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj: nn.Linear | None = None  # fused copy made by fuse(); one GEMM not three
        self.batch_invariant = False  # see kernels.invariant

    def fuse(self) -> None:
        """Concatenate q/k/v weights into one projection (after the checkpoint is loaded)."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                          bias=parts[0].bias is not None)
        fused = fused.to(device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        self.qkv_proj = fused

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        q_dim, kv_dim = self.q_proj.out_features, self.k_proj.out_features
        return project(self.qkv_proj, x).split([q_dim, kv_dim, kv_dim], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads + self.num_kv_heads
        if self.qkv_proj is not None:  # rotate q and k together: one rope for both
            qkv = project(self.qkv_proj, x)  # [T, (H + 2 Hkv) * D]
            qk = apply_rope(qkv[:, :heads * self.head_dim].reshape(num_tokens, heads, -1),
                            cos, sin)  # [T, H + Hkv, D]
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, heads * self.head_dim:].reshape(num_tokens, self.num_kv_heads, -1)
        else:
            q, k, v = self._qkv(x)
            q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)  # [NB*BS, Hkv, D]
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_k[meta.slot_mapping] = k.to(flat_k.dtype)
        flat_v[meta.slot_mapping] = v.to(flat_v.dtype)
        attend = attention_per_query if self.batch_invariant else tree_attention
        out = attend(q, k_cache, v_cache, meta, self.scale)  # [T, H, D]
        return project(self.o_proj, out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # fused copy made by fuse()

    def fuse(self) -> None:
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])  # [2 * ffn, hidden]
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(w)
        self.gate_up_proj = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = project(self.gate_proj, x), project(self.up_proj, x)
        else:
            gate, up = project(self.gate_up_proj, x).chunk(2, dim=-1)  # [T, ffn] each
        return project(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.self_attn = Attention(cfg, qkv_bias, o_bias)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        # .forward directly: nn.Module.__call__ costs more than the small ops it wraps
        h = self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, k_cache, v_cache,
                                   meta)
        x = x + h
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, o_bias)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """`model.*` + `lm_head` exactly as in HF's LlamaForCausalLM."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg, qkv_bias, o_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: RopeTable | None = None  # made by fuse()
        self.fused_layers: cpu_layer.FusedLayers | None = None  # made by fuse() where it fits
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse(self, quantize: str = "none") -> None:
        """Prepare for inference: fuse q/k/v and gate/up projections (fewer, larger GEMMs),
        keep fp16 checkpoints' weights in fp16 for the CPU kernel (in int8 with
        `quantize="int8"`: a draft's, `kernels.quantize`) or else pack them for
        few-row GEMMs where the CPU has MKL (`kernels.linear`), and
        precompute the rotary table. The separate modules keep their checkpoint names; the
        fused copies are what run."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                      layer.mlp.gate_proj, layer.mlp.up_proj):
                m.weight = nn.Parameter(m.weight.data[:0].clone(), requires_grad=False)
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                      layer.mlp.gate_up_proj, layer.mlp.down_proj):
                (quantize == "int8" and attach_q8(m)) or attach_f16(m) or pack_linear(m)
        attach_f16(self.lm_head, free_fp32=not self.config.tie_word_embeddings) \
            or pack_linear(self.lm_head)
        self._arena_f16()
        norm = self.model.norm.weight  # the serving dtype and device, whatever lm_head holds
        self.rope = RopeTable(self.config.max_position_embeddings, self.config.head_dim,
                              self.config.rope_theta, norm.dtype, norm.device)
        self.fused_layers = cpu_layer.FusedLayers.build(self)

    def _arena_f16(self) -> None:
        """Lay the fp16-resident weights out back to back, in forward order, in one huge-page
        arena, and mark them streamed where the model is far bigger than the last-level cache
        (`kernels.weight_arena`)."""
        mods = [m for layer in self.model.layers
                for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                          layer.mlp.gate_up_proj, layer.mlp.down_proj)] + [self.lm_head]
        f16 = [m for m in mods if getattr(m, "weight_f16", None) is not None]
        q8 = [m for m in mods if getattr(m, "weight_q8", None) is not None]
        stream = weight_arena.streamed(sum(m.weight_f16.nbytes for m in f16)
                                       + sum(m.weight_q8.nbytes for m in q8))
        for m in f16 + q8:
            m.stream_weights = stream
        if not weight_arena.enabled():
            return
        for m, w in zip(f16, weight_arena.pack([m.weight_f16 for m in f16])):
            m.weight_f16 = w
        for m, w in zip(q8, weight_arena.pack([m.weight_q8 for m in q8])):
            m.weight_q8 = w

    def set_batch_invariant(self, on: bool = True) -> None:
        """Bitwise batch-invariant logits (row-wise GEMVs, per-query attention); see
        `kernels.invariant`. Slower: for reproducibility, not speed."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.row_wise = on
            elif isinstance(module, Attention):
                module.batch_invariant = on
        if on:
            self.fused_layers = None  # the invariant path's own GEMVs and attention run

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # [T] int64, packed over sequences
        positions: torch.Tensor,  # [T] int64, rotary position of each token
        meta: AttentionMetadata,
        k_pool: torch.Tensor,  # [num_layers, num_blocks, block_size, Hkv, D]
        v_pool: torch.Tensor,  # [num_layers, num_blocks, block_size, Hkv, D]
        logits_indices: torch.Tensor | None = None,  # [M] rows that need logits; None = all
        positions_checked: bool = False,  # every position < max_position_embeddings (graphs)
    ) -> torch.Tensor:  # [M, vocab_size] float32
        x = self.model.embed_tokens(tokens)  # [T, hidden]
        if self.rope is not None and self.rope.cos.dtype == x.dtype:
            cos, sin = self.rope.lookup(positions, positions_checked)  # [T, D] each
        else:
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                    x.dtype)
        fused = self.fused_layers
        if fused is not None and fused.fits(x, k_pool):
            x = fused.run(x, cos, sin, meta, k_pool, v_pool)  # one C call per layer
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer.forward(x, cos, sin, k_pool[i], v_pool[i], meta)
        if logits_indices is not None:
            x = x[logits_indices]  # [M, hidden]
        return project(self.lm_head, self.model.norm.forward(x)).float()  # [M, vocab]
