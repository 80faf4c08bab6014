"""The fp16 weight arena (`kernels.weight_arena`): exact copies laid out back to back in forward
order, cache-line aligned, in one huge-page-aligned buffer, and a model served from it gives the
same logits as one served from separate tensors."""

from __future__ import annotations

import pytest
import torch

from specmesh.kernels import weight_arena
from specmesh.kernels.attention_metadata import build_metadata
from specmesh.kernels.config import ModelConfig
from specmesh.kernels.model import Transformer
from tests.kernels.test_cpu_layer import _batch, _pools


def test_pack_copies_exactly_in_order_and_aligned():
    tensors = [torch.randn(3, 5).half(), torch.randn(7).half(), torch.randn(2, 33).half()]
    packed = weight_arena.pack(tensors)
    assert [p.shape for p in packed] == [t.shape for t in tensors]
    for t, p in zip(tensors, packed):
        assert torch.equal(t, p) and p.is_contiguous() and p.data_ptr() != t.data_ptr()
        assert p.data_ptr() % weight_arena.ALIGN == 0
    ptrs = [p.data_ptr() for p in packed]
    assert ptrs == sorted(ptrs)  # forward order is memory order
    assert ptrs[1] - ptrs[0] == 64 and ptrs[2] - ptrs[1] == 64  # 30 and 14 bytes, each one line
    assert ptrs[0] % weight_arena.HUGE == 0  # the arena starts on a huge page
    assert weight_arena.pack([]) == []


def test_offsets_round_up_to_cache_lines():
    offsets, total = weight_arena._offsets([torch.empty(32, dtype=torch.float16),
                                            torch.empty(33, dtype=torch.float16)])
    assert offsets == [0, 64] and total == 192


def _model(arena: str, monkeypatch) -> Transformer:
    monkeypatch.setenv("SPECMESH_WEIGHT_ARENA", arena)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.2).half().float())
    model.fuse()
    return model.eval()


def _assert_same_forward(a: Transformer, b: Transformer) -> None:
    """Bitwise the same logits and KV from one packed forward of both models."""
    steps, tokens, positions = _batch()
    k1, v1 = _pools(a)
    k2, v2 = k1.clone(), v1.clone()
    got = a(tokens, positions, build_metadata(steps, block_size=4), k1, v1)  # [T, vocab]
    want = b(tokens, positions, build_metadata(steps, block_size=4), k2, v2)
    assert torch.equal(got, want) and torch.equal(k1, k2)


def test_model_weights_live_in_one_arena_and_logits_match(monkeypatch):
    on, off = _model("1", monkeypatch), _model("0", monkeypatch)
    weights = [m.weight_f16 for m in on.modules() if getattr(m, "weight_f16", None) is not None]
    if not weights:
        pytest.skip("no fp16-resident weights here (CPU kernels unavailable)")
    storages = {w.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == 1
    _assert_same_forward(on, off)


def test_streamed_policy(monkeypatch):
    monkeypatch.setenv("SPECMESH_STREAM_MB", "100")
    assert weight_arena.streamed(101 << 20) and not weight_arena.streamed(100 << 20)
    monkeypatch.delenv("SPECMESH_STREAM_MB")
    llc = weight_arena.llc_bytes()
    threshold = 2 * llc if llc else int(weight_arena.STREAM_FALLBACK_MB) << 20
    assert weight_arena.streamed(threshold + 1) and not weight_arena.streamed(threshold)
    monkeypatch.setenv("SPECMESH_STREAM_MB", "")  # set but empty: as unset (it failed the load)
    assert weight_arena.streamed(threshold + 1) and not weight_arena.streamed(threshold)
    monkeypatch.setenv("SPECMESH_STREAM_MB", "lots")
    with pytest.raises(ValueError, match="SPECMESH_STREAM_MB"):
        weight_arena.streamed(1)


def test_streaming_changes_no_result(monkeypatch):
    """Non-temporal prefetch is a cache hint: bitwise the same products and logits."""
    from specmesh.kernels import cpu_linear

    if not cpu_linear.available():
        pytest.skip("CPU kernels unavailable")
    gen = torch.Generator().manual_seed(3)
    w = cpu_linear.pack_panels(torch.randn(200, 96, generator=gen).half())  # 4 panels
    x = torch.randn(9, 96, generator=gen)  # [M, K]: two passes
    assert torch.equal(cpu_linear.linear_f16(x, w, 200, stream=True),
                       cpu_linear.linear_f16(x, w, 200))
    monkeypatch.setenv("SPECMESH_STREAM_MB", "0")
    on = _model("1", monkeypatch)
    monkeypatch.setenv("SPECMESH_STREAM_MB", "1000000")
    off = _model("1", monkeypatch)
    assert on.lm_head.stream_weights and not off.lm_head.stream_weights
    if on.fused_layers is not None:
        assert on.fused_layers._weights[0].stream == 1 and off.fused_layers._weights[0].stream == 0
    _assert_same_forward(on, off)
