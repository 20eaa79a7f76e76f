"""The paged KV cache: write_packed is bit-exact and touches only the request's rows; a pool that
does not fit in memory is refused with its size named."""

from __future__ import annotations

import pytest
import torch

from disagg.errors import KVMismatchError, KVPoolMemoryError
from disagg.kv.block_pool import BlockPool
from disagg.kv.layout import KVLayout, PackedKV
from disagg.kv.paged_cache import PagedKVCache


def random_packed(layout: KVLayout, n: int, seed: int) -> PackedKV:
    g = torch.Generator().manual_seed(seed)
    shape = (n, *layout.row_shape)
    def make():
        return torch.randn(shape, generator=g).to(layout.dtype)

    return PackedKV(k=[make() for _ in range(layout.num_layers)],
                    v=[make() for _ in range(layout.num_layers)])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (NaN == NaN there)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_packed_is_bit_exact_into_a_fragmented_table(dtype):
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=dtype)
    pool = BlockPool(24, 4)
    cache = PagedKVCache(layout, 24, 4)
    for t in cache.k + cache.v:
        t.fill_(float("nan"))  # poison: rows we do not write must stay NaN
    holders = [pool.allocate(3) for _ in range(8)]
    for t in holders[::2]:
        pool.free(t)
    table = pool.allocate(9)  # 3 holes of 3 blocks
    assert len(table.ranges) == 3
    n = 33  # not a multiple of the block size
    packed = random_packed(layout, n, seed=1)
    packed.k[1][5] = float("nan")  # NaN payloads travel too
    cache.write_packed(table, packed)
    slots = cache.slot_mapping(table, 0, n)
    for layer in range(3):
        assert torch.equal(bits(cache.k[layer][slots]), bits(packed.k[layer]))
        assert torch.equal(bits(cache.v[layer][slots]), bits(packed.v[layer]))
        untouched = torch.ones(cache.k[layer].shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert cache.k[layer][untouched].isnan().all() and cache.v[layer][untouched].isnan().all()
    back = cache.read_packed(table, n)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(back.k, packed.k))


def test_slot_mapping_matches_the_block_ids():
    layout = KVLayout(1, 1, 4, torch.float32)
    pool = BlockPool(16, 4)
    cache = PagedKVCache(layout, 16, 4)
    keep = [pool.allocate(2) for _ in range(4)]
    pool.free(keep[1])
    table = pool.allocate(5)
    ids = table.block_ids
    expected = [ids[p // 4] * 4 + p % 4 for p in range(3, 19)]
    assert cache.slot_mapping(table, 3, 19).tolist() == expected


def test_write_packed_rejects_another_layout():
    layout = KVLayout(2, 2, 8, torch.float32)
    cache = PagedKVCache(layout, 4, 4)
    table = BlockPool(4, 4).allocate(2)
    with pytest.raises(KVMismatchError, match="layers"):
        cache.write_packed(table, random_packed(KVLayout(3, 2, 8, torch.float32), 5, 0))
    with pytest.raises(KVMismatchError):
        cache.write_packed(table, random_packed(KVLayout(2, 2, 8, torch.bfloat16), 5, 0))


def test_a_pool_that_does_not_fit_is_a_typed_error_naming_its_size():
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    with pytest.raises(KVPoolMemoryError) as info:  # 2 PiB: no allocator gives that
        PagedKVCache(layout, num_blocks=1 << 30, block_size=16)
    assert "1073741824 blocks (2097152.00 GiB)" in str(info.value), info.value
    assert isinstance(info.value, MemoryError)
