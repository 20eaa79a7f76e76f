"""The block pool: extents, fragmentation, and its free/alloc invariants."""

from __future__ import annotations

import itertools
import random

import pytest

from disagg.kv.block_pool import BlockPool, BlockRange, BlockTable, blocks_for


def check_invariants(pool: BlockPool, tables: list[BlockTable]) -> None:
    free = pool.free_ranges()
    assert sum(r.num_blocks for r in free) == pool.num_free_blocks
    for a, b in itertools.pairwise(free):
        assert a.end < b.start, "free ranges are sorted, disjoint and coalesced"
    owned = [b for t in tables for b in t.block_ids]
    free_ids = [b for r in free for b in range(r.start, r.end)]
    assert len(set(owned)) == len(owned), "no block belongs to two tables"
    assert sorted(owned + free_ids) == list(range(pool.num_total_blocks))


def test_fresh_pool_allocates_one_range():
    pool = BlockPool(100, 16)
    table = pool.allocate(37)
    assert table.ranges == (BlockRange(0, 37),)
    assert pool.num_free_blocks == 63 and pool.can_allocate(63) and not pool.can_allocate(64)
    pool.free(table)
    assert pool.free_ranges() == (BlockRange(0, 100),)


def fragmented(pool: BlockPool, size: int) -> list[BlockTable]:
    """Fill ``pool`` with tables of ``size`` blocks and free every other one."""
    tables = [pool.allocate(size) for _ in range(pool.num_total_blocks // size)]
    for t in tables[1::2]:
        pool.free(t)
    return tables[0::2]


def test_allocation_uses_the_fewest_runs_on_a_fragmented_pool():
    pool = BlockPool(40, 4)
    kept = fragmented(pool, 4)  # free: five holes of 4 blocks
    assert len(pool.free_ranges()) == 5
    table = pool.allocate(10)  # needs 3 runs of at most 4
    assert len(table.ranges) == 3 and table.num_blocks == 10
    check_invariants(pool, kept + [table])


def test_best_fit_keeps_large_ranges_whole():
    pool = BlockPool(30, 1)
    a, gap1, b, gap2, c = (pool.allocate(n) for n in (3, 8, 2, 5, 12))
    pool.free(gap1)
    pool.free(gap2)  # free: [3, 11) (8 blocks), [13, 18) (5 blocks)
    table = pool.allocate(4)
    assert table.ranges == (BlockRange(13, 4),)  # the 5-block hole, not the 8-block one
    check_invariants(pool, [a, b, c, table])


def test_grow_extends_the_last_range_in_place_when_it_can():
    pool = BlockPool(20, 16)
    t = pool.allocate(3)
    t = pool.grow(t, 2)
    assert t.ranges == (BlockRange(0, 5),)
    other = pool.allocate(1)  # block 5: the next growth must jump
    t = pool.grow(t, 2)
    assert t.ranges == (BlockRange(0, 5), BlockRange(6, 2))
    check_invariants(pool, [t, other])


def test_double_free_and_foreign_ranges_raise():
    pool = BlockPool(10, 4)
    t = pool.allocate(4)
    pool.free(t)
    with pytest.raises(ValueError, match="double free"):
        pool.free(t)
    with pytest.raises(ValueError):
        pool.free(BlockTable((BlockRange(8, 5),)))
    with pytest.raises(MemoryError):
        pool.allocate(11)
    assert pool.free_ranges() == (BlockRange(0, 10),)


def test_random_alloc_grow_free_keeps_the_invariants():
    rng = random.Random(0)
    pool = BlockPool(97, 8)
    tables: list[BlockTable] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and pool.num_free_blocks:
            tables.append(pool.allocate(rng.randint(1, min(12, pool.num_free_blocks))))
        elif op < 0.6 and tables and pool.num_free_blocks:
            i = rng.randrange(len(tables))
            tables[i] = pool.grow(tables[i], rng.randint(1, min(3, pool.num_free_blocks)))
        elif tables:
            pool.free(tables.pop(rng.randrange(len(tables))))
        check_invariants(pool, tables)
    for t in tables:
        pool.free(t)
    assert pool.free_ranges() == (BlockRange(0, 97),)


def test_slot_runs_follow_the_block_table():
    bs = 4
    table = BlockTable((BlockRange(10, 2), BlockRange(3, 1), BlockRange(20, 3)))
    runs = table.slot_runs(bs, 0, 22)
    assert runs == [(40, 0, 8), (12, 8, 4), (80, 12, 10)]
    slots = [s + i for s, _, n in runs for i in range(n)]
    ids = table.block_ids
    assert slots == [ids[p // bs] * bs + p % bs for p in range(22)]
    assert table.slot_runs(bs, 6, 13) == [(46, 6, 2), (12, 8, 4), (80, 12, 1)]
    with pytest.raises(ValueError):
        table.slot_runs(bs, 0, 25)
    assert blocks_for(0, bs) == 0 and blocks_for(1, bs) == 1 and blocks_for(8, bs) == 2
