"""PagedKVCache invariants: blocks are never leaked or owned twice, whatever the operations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from specmesh.kernels.kv_cache import NoRoom, PagedKVCache

BS = 4  # block size


def make(num_blocks: int = 16, layers: int = 2, heads: int = 2, dim: int = 3) -> PagedKVCache:
    return PagedKVCache(layers, heads, dim, BS, num_blocks)


def check_invariants(kv: PagedKVCache) -> None:
    """Every block is either free or in exactly one block table; lengths fit the tables."""
    tables = [kv.block_table(s) for s in kv.sequence_ids()]
    owned = [b for t in tables for b in t]
    free = list(kv._free)  # noqa: SLF001 - the free list is the other half of the invariant
    assert len(owned) == len(set(owned)), "a block is in two tables (or twice in one)"
    assert len(free) == len(set(free)), "a block is free twice"
    assert not set(owned) & set(free), "a block is both owned and free"
    assert sorted(owned + free) == list(range(kv.num_blocks)), "a block leaked"
    assert kv.num_free_blocks + kv.num_used_blocks == kv.num_blocks
    assert kv.num_used_blocks == len(owned)
    for s in kv.sequence_ids():
        n = kv.num_tokens(s)
        assert 0 <= n <= len(kv.block_table(s)) * BS


class Model:
    """What the cache should hold: per sequence, its number of tokens and reserved blocks."""

    def __init__(self, kv: PagedKVCache):
        self.kv = kv
        self.seqs: dict[str, tuple[int, int]] = {}  # seq -> (num_tokens, num_blocks)

    def free_blocks(self) -> int:
        return self.kv.num_blocks - sum(b for _, b in self.seqs.values())


def random_op(rng: random.Random, kv: PagedKVCache, model: Model) -> None:
    ids = [f"s{i}" for i in range(6)]
    op = rng.choice(["create", "reserve", "reserve", "set", "truncate", "truncate", "free",
                     "evict_lru", "touch", "evict_idle"])
    live = list(model.seqs)
    if op == "create" or not live:
        seq = rng.choice(ids)
        kv.create(seq)
        model.seqs.pop(seq, None)
        model.seqs[seq] = (0, 0)
        return
    seq = rng.choice(live)
    n_tok, n_blk = model.seqs[seq]
    if op == "reserve":
        want = rng.randint(0, 40)
        needed = math.ceil(want / BS) - n_blk
        free_before = kv.num_free_blocks
        table_before = kv.block_table(seq)
        got = kv.reserve(seq, want)
        if needed > free_before:
            assert got == NoRoom(needed=needed, free=free_before)  # exact counts
            assert kv.block_table(seq) == table_before  # all-or-nothing
            assert kv.num_free_blocks == free_before
        else:
            assert got is None
            model.seqs[seq] = (n_tok, max(n_blk, math.ceil(want / BS)))
            assert kv.block_table(seq)[:n_blk] == table_before  # existing blocks stay put
    elif op == "set":
        n = rng.randint(0, n_blk * BS)
        kv.set_num_tokens(seq, n)
        model.seqs[seq] = (n, n_blk)
    elif op == "truncate":
        n = rng.randint(0, n_tok + 3)
        kv.truncate(seq, n)
        kept = min(n, n_tok)
        model.seqs[seq] = (kept, math.ceil(kept / BS))
    elif op == "free":
        assert kv.free(seq) is True
        del model.seqs[seq]
        assert kv.free(seq) is False
    elif op == "touch":
        kv.touch(seq)
        model.seqs[seq] = model.seqs.pop(seq)  # most recent last
    elif op == "evict_lru":
        target = rng.randint(0, kv.num_blocks)
        keep = set(rng.sample(live, rng.randint(0, len(live))))
        gone = kv.evict_lru(target, keep=keep)
        expected = []
        free = model.free_blocks()
        for s in list(model.seqs):  # least recently used first
            if free >= target:
                break
            if s not in keep:
                free += model.seqs.pop(s)[1]
                expected.append(s)
        assert gone == expected
        assert not set(gone) & keep
    elif op == "evict_idle":
        keep = set(rng.sample(live, rng.randint(0, len(live))))
        gone = kv.evict_idle(-1.0, keep=keep)  # everyone is idle for more than -1 s
        assert sorted(gone) == sorted(set(live) - keep)
        for s in gone:
            del model.seqs[s]


@pytest.mark.parametrize("seed", range(20))
def test_random_operations_never_leak_or_double_own_blocks(seed):
    rng = random.Random(seed)
    kv = make(num_blocks=rng.randint(1, 24))
    model = Model(kv)
    for _ in range(300):
        random_op(rng, kv, model)
        check_invariants(kv)
        assert kv.sequence_ids() == list(model.seqs)  # LRU order
        for s, (n_tok, n_blk) in model.seqs.items():
            assert kv.num_tokens(s) == n_tok
            assert len(kv.block_table(s)) == n_blk
    for s in list(model.seqs):
        kv.free(s)
    assert kv.num_free_blocks == kv.num_blocks
    check_invariants(kv)


def test_reserve_is_all_or_nothing_with_exact_counts():
    kv = make(num_blocks=5)
    kv.create("a")
    kv.create("b")
    assert kv.reserve("a", 9) is None  # 3 blocks
    assert kv.reserve("b", 13) == NoRoom(needed=4, free=2)
    assert kv.block_table("b") == [] and kv.num_free_blocks == 2
    assert kv.reserve("a", 12) is None  # still 3 blocks: nothing taken
    assert kv.num_free_blocks == 2
    assert kv.reserve("a", 13) is None and kv.num_free_blocks == 1  # one more block
    assert kv.reserve("b", 5) == NoRoom(needed=2, free=1)
    check_invariants(kv)


def test_truncate_returns_whole_blocks_past_the_end():
    kv = make(num_blocks=8)
    kv.create("a")
    kv.reserve("a", 4 * BS)
    kv.set_num_tokens("a", 4 * BS - 1)
    table = kv.block_table("a")
    kv.truncate("a", BS + 1)  # keeps 2 blocks
    assert kv.num_tokens("a") == BS + 1
    assert kv.block_table("a") == table[:2]
    assert kv.num_free_blocks == 6
    kv.truncate("a", 100)  # never grows
    assert kv.num_tokens("a") == BS + 1
    kv.truncate("a", 0)
    assert kv.block_table("a") == [] and kv.num_free_blocks == 8
    check_invariants(kv)


def test_truncate_drops_reserved_but_unwritten_blocks():
    kv = make(num_blocks=8)
    kv.create("a")
    kv.reserve("a", 3 * BS)
    kv.set_num_tokens("a", BS)
    kv.truncate("a", kv.num_tokens("a"))  # rollback of a tree: only committed KV stays
    assert len(kv.block_table("a")) == 1
    check_invariants(kv)


def test_set_num_tokens_must_fit_the_reserved_blocks():
    kv = make()
    kv.create("a")
    kv.reserve("a", BS)
    with pytest.raises(ValueError, match="exceed"):
        kv.set_num_tokens("a", BS + 1)
    with pytest.raises(ValueError, match="negative"):
        kv.set_num_tokens("a", -1)


def test_truncate_below_zero_empties_the_sequence():
    kv = make()
    kv.create("a")
    kv.reserve("a", 2 * BS)
    kv.set_num_tokens("a", BS + 2)
    kv.truncate("a", -1)
    assert kv.num_tokens("a") == 0 and kv.block_table("a") == []
    check_invariants(kv)


def test_create_of_a_live_id_frees_its_old_blocks():
    kv = make(num_blocks=4)
    kv.create("a")
    kv.reserve("a", 4 * BS)
    kv.create("a")
    assert kv.num_free_blocks == 4 and kv.num_tokens("a") == 0
    check_invariants(kv)


def test_evict_lru_goes_in_lru_order_and_respects_keep():
    kv = make(num_blocks=8)
    for s in "abcd":
        kv.create(s)
        kv.reserve(s, 2 * BS)  # 2 blocks each: pool full
    kv.touch("a")  # order now b, c, d, a
    assert kv.sequence_ids() == ["b", "c", "d", "a"]
    assert kv.evict_lru(3, keep={"b"}) == ["c", "d"]  # b kept; c frees 2, d frees 2 more
    assert kv.sequence_ids() == ["b", "a"] and kv.num_free_blocks == 4
    assert kv.evict_lru(4) == []  # already enough
    assert kv.evict_lru(8, keep={"a", "b"}) == []  # nothing it may evict
    assert kv.evict_lru(8) == ["b", "a"]
    check_invariants(kv)


def test_evict_idle_respects_keep_and_age():
    kv = make()
    for s in "abc":
        kv.create(s)
        kv.reserve(s, BS)
    assert kv.evict_idle(3600.0) == []  # nobody idle for an hour
    assert sorted(kv.evict_idle(-1.0, keep={"b"})) == ["a", "c"]
    assert kv.sequence_ids() == ["b"]
    check_invariants(kv)


def test_no_room_is_a_result_not_an_exception():
    kv = make(num_blocks=1)
    kv.create("a")
    assert kv.reserve("a", BS) is None
    kv.create("b")
    assert kv.reserve("b", 1) == NoRoom(needed=1, free=0)


def fill(kv: PagedKVCache, seq: str, n: int, gen: torch.Generator) -> None:
    """Write distinct random K/V into positions [0, n) of `seq`."""
    slots = kv.slots(seq, torch.arange(n))
    for pool in (kv.k, kv.v):
        flat = pool.view(pool.shape[0], -1, *pool.shape[3:])  # [L, NB*BS, H, D]
        flat[:, slots] = torch.randn(flat.shape[0], n, *flat.shape[2:], generator=gen)


def read(kv: PagedKVCache, seq: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots = kv.slots(seq, positions)
    out = []
    for pool in (kv.k, kv.v):
        flat = pool.view(pool.shape[0], -1, *pool.shape[3:])
        out.append(flat[:, slots].clone())  # [L, n, H, D]
    return out[0], out[1]


@pytest.mark.parametrize("src,dst", [
    ([9, 11, 14], 9),  # tree path compaction across block boundaries
    ([5, 6, 7], 2),  # overlapping, moving left
    ([2, 3], 2),  # in place: nothing to do
    ([13], 4),
    ([], 3),
])
def test_move_copies_kv_exactly(src, dst):
    gen = torch.Generator().manual_seed(0)
    kv = make(num_blocks=12)
    for s in ("other", "a"):  # interleaved tables: a's blocks are not contiguous
        kv.create(s)
    for step in range(1, 5):
        for s in ("other", "a"):
            kv.reserve(s, step * BS)
    fill(kv, "a", 4 * BS, gen)
    fill(kv, "other", 4 * BS, gen)
    other_before = read(kv, "other", torch.arange(4 * BS))
    src_t = torch.tensor(src, dtype=torch.int64)
    want = read(kv, "a", src_t)
    untouched = [p for p in range(4 * BS) if not dst <= p < dst + len(src)]
    keep_before = read(kv, "a", torch.tensor(untouched))
    kv.move("a", src_t, dst)
    got = read(kv, "a", torch.arange(dst, dst + len(src)))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    after = read(kv, "a", torch.tensor(untouched))
    assert torch.equal(after[0], keep_before[0]) and torch.equal(after[1], keep_before[1])
    other_after = read(kv, "other", torch.arange(4 * BS))
    assert torch.equal(other_after[0], other_before[0])
    assert torch.equal(other_after[1], other_before[1])


def test_blocks_for_mb():
    per_block = 2 * 2 * BS * 2 * 3 * 4  # K+V, layers, block, heads, dim, fp32
    assert PagedKVCache.blocks_for_mb(1.0, 2, 2, 3, BS, torch.float32) == 2**20 // per_block
    assert PagedKVCache.blocks_for_mb(0.0, 2, 2, 3, BS, torch.float32) == 1
