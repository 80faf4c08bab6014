"""KV export/import between the paged cache and numpy, across block boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.kv_transfer import export_chunks, import_chunks, numpy_dtype

L, HKV, D, BS = 3, 2, 4, 4


def _cache(dtype: torch.dtype, device: str = "cpu") -> PagedKVCache:
    kv = PagedKVCache(L, HKV, D, block_size=BS, num_blocks=24, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    kv.k.copy_(torch.randn(kv.k.shape, generator=gen))
    kv.v.copy_(torch.randn(kv.v.shape, generator=gen))
    return kv


def _interleaved(kv: PagedKVCache, seq: str, num_positions: int) -> None:
    """Reserve `seq` one block at a time, alternating with a filler, so its table is scattered."""
    kv.create(seq)
    kv.create("filler")
    for n in range(1, -(-num_positions // BS) + 1):
        assert kv.reserve(seq, n * BS) is None
        assert kv.reserve("filler", n * BS) is None
    kv.free("filler")
    kv.set_num_tokens(seq, num_positions)


def _reference(kv: PagedKVCache, seq: str, start: int, end: int) -> torch.Tensor:
    table = kv.block_table(seq)
    rows = []
    for pool in (kv.k, kv.v):
        rows.append(torch.stack([pool[:, table[p // BS], p % BS] for p in range(start, end)], 1))
    return torch.stack(rows, 1)  # [L, 2, n, Hkv, D]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_across_blocks(dtype, device):
    kv = _cache(dtype, device)
    _interleaved(kv, "a", 30)
    table = kv.block_table("a")
    assert table != sorted(table) or np.any(np.diff(table) != 1)  # not one contiguous run

    start, end = 3, 27  # starts and ends mid-block
    out = export_chunks(kv, "a", start, end)
    assert out.shape == (L, 2, end - start, HKV, D)
    assert out.dtype == numpy_dtype(kv)
    ref = _reference(kv, "a", start, end)
    got = torch.from_numpy(out.view(np.int16) if dtype == torch.bfloat16 else out)
    assert torch.equal(got.view(dtype), ref.cpu())  # bit for bit, dtype preserved

    # import into another sequence whose blocks came back in a different order
    kv.create("b")
    assert kv.reserve("b", 32) is None
    assert kv.block_table("b") != table[:8]
    before = _reference(kv, "b", 0, 32).clone()
    import_chunks(kv, "b", start, out)
    after = _reference(kv, "b", 0, 32)
    assert torch.equal(after[:, :, start:end], ref)
    assert torch.equal(after[:, :, :start], before[:, :, :start])  # nothing else written
    assert torch.equal(after[:, :, end:], before[:, :, end:])
    assert kv.num_tokens("b") == 0  # import sets no lengths


def test_chunked_export_concatenates():
    kv = _cache(torch.float32)
    _interleaved(kv, "a", 16)
    whole = export_chunks(kv, "a", 0, 16)
    parts = [export_chunks(kv, "a", s, s + 4) for s in range(0, 16, 4)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=2), whole)
    chunks = np.split(whole, 4, axis=2)
    kv.create("b")
    kv.reserve("b", 16)
    for i, c in enumerate(chunks):
        import_chunks(kv, "b", 4 * i, c)
    kv.set_num_tokens("b", 16)
    np.testing.assert_array_equal(export_chunks(kv, "b", 0, 16), whole)


def test_read_only_array_imports():
    kv = _cache(torch.float16)
    _interleaved(kv, "a", 8)
    out = export_chunks(kv, "a", 0, 8)
    frozen = np.frombuffer(out.tobytes(), dtype=out.dtype).reshape(out.shape)
    kv.create("b")
    kv.reserve("b", 8)
    import_chunks(kv, "b", 0, frozen)
    kv.set_num_tokens("b", 8)
    np.testing.assert_array_equal(export_chunks(kv, "b", 0, 8), out)


def test_bad_arguments():
    kv = _cache(torch.float32)
    _interleaved(kv, "a", 10)
    with pytest.raises(ValueError):
        export_chunks(kv, "a", 0, 11)  # past the valid positions
    out = export_chunks(kv, "a", 0, 8)
    with pytest.raises(ValueError):
        import_chunks(kv, "a", 8, out)  # 16 > 12 reserved positions
    with pytest.raises(ValueError):
        import_chunks(kv, "a", 0, out.astype(np.float16))
    with pytest.raises(ValueError):
        import_chunks(kv, "a", 0, out[:, :, :, :1])
    assert export_chunks(kv, "a", 4, 4).shape == (L, 2, 0, HKV, D)
