"""Whole decoder layers in one C call (`kernels/csrc/layer_f16.c`): the same results as the
layer-by-op path (KV written bitwise equal, outputs within rounding), row by row independent of
the batch, with and without projection biases, and used by real fp16 models."""

from __future__ import annotations

import pytest
import torch

from specmesh.kernels import cpu_layer, cpu_linear
from specmesh.kernels.attention_metadata import SequenceStep, build_metadata
from specmesh.kernels.config import ModelConfig
from specmesh.kernels.model import Transformer

needs_kernels = pytest.mark.skipif(not cpu_linear.available() or cpu_layer._library() is None,
                                   reason="CPU kernels unavailable (no compiler or AVX-512)")


def _model(qkv_bias: bool = False, layers: int = 2, quantize: str = "none") -> Transformer:
    """A small Llama whose weights are fp16 values (so they are served from fp16; int8 with
    `quantize="int8"`)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=layers,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Transformer(cfg, qkv_bias=qkv_bias)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.2).half().float())
        for layer in model.model.layers:  # norms away from 1: their weights matter
            layer.input_layernorm.weight.add_(0.5)
    model.fuse(quantize)
    return model.eval()


def _batch():
    """Two sequences, one with a 3-node tree, on scattered blocks of 4."""
    ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    steps = [SequenceStep([3, 0, 7], 6, 2, ancestors), SequenceStep([5, 1], 5, 1)]
    tokens = torch.tensor([5, 9, 12, 3, 40, 7])  # [T]
    positions = torch.tensor([6, 7, 8, 9, 9, 5])  # [T]
    return steps, tokens, positions


def _forward(model, steps, tokens, positions, k_pool, v_pool):
    meta = build_metadata(steps, block_size=4)
    return model(tokens, positions, meta, k_pool, v_pool)  # [T, vocab]


def _pools(model):
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.num_layers, 9, 4, cfg.num_kv_heads, cfg.head_dim)  # [L, blocks, bs, Hkv, D]
    return torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)


@needs_kernels
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_equals_the_layer_by_op_path(qkv_bias):
    model = _model(qkv_bias)
    fused = model.fused_layers
    assert fused is not None
    steps, tokens, positions = _batch()
    k1, v1 = _pools(model)
    k2, v2 = k1.clone(), v1.clone()
    got = _forward(model, steps, tokens, positions, k1, v1)
    model.fused_layers = None
    want = _forward(model, steps, tokens, positions, k2, v2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the first layer's KV is computed from identical inputs with identical arithmetic
    assert torch.equal(k1[0], k2[0]) and torch.equal(v1[0], v2[0])
    torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_a_row_does_not_depend_on_its_batch_mates():
    model = _model()
    steps, tokens, positions = _batch()
    k, v = _pools(model)
    both = _forward(model, steps, tokens, positions, k.clone(), v.clone())
    alone = _forward(model, steps[1:], tokens[5:], positions[5:], k.clone(), v.clone())
    assert torch.equal(alone, both[5:])


@needs_kernels
def test_not_used_where_a_piece_has_no_kernel():
    model = _model()
    model.set_batch_invariant(True)
    assert model.fused_layers is None
    fp32 = _model()
    fp32.model.layers[1].mlp.down_proj.weight_f16 = None  # one projection without fp16 weights
    assert cpu_layer.FusedLayers.build(fp32) is None


@needs_kernels
def test_the_stand_in_models_run_fused(models):
    from specmesh.kernels.loader import load_model

    for name in ("stories260K-wide78M", "stories260K-draft2L-wide5M"):
        loaded = load_model(models / name, torch.float32, "cpu")
        assert loaded.model.fused_layers is not None, name
