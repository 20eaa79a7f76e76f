"""PagedAttention over a mixed batch equals dense causal attention of each sequence."""

from __future__ import annotations

import torch

from disagg.attention.dense import dense_attention
from disagg.attention.paged import PagedAttention, SequenceSlice
from disagg.kv.block_pool import BlockPool
from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache

HQ, HKV, D = 6, 2, 16  # GQA 3:1


def test_mixed_batch_equals_dense_attention_per_sequence():
    g = torch.Generator().manual_seed(0)
    layout = KVLayout(num_layers=1, num_kv_heads=HKV, head_dim=D, dtype=torch.float32)
    pool = BlockPool(64, 4)
    cache = PagedKVCache(layout, 64, 4)
    # (tokens already cached, new tokens): three decode rows, a fresh prompt, a later chunk.
    shapes = [(17, 1), (5, 1), (40, 1), (0, 23), (12, 9)]
    fillers = [pool.allocate(2) for _ in range(32)]
    for t in fillers[::2]:
        pool.free(t)  # fragment the pool so tables span several ranges
    full_k, full_v, slices = [], [], []
    for cached, new in shapes:
        n = cached + new
        full_k.append(torch.randn(n, HKV, D, generator=g))
        full_v.append(torch.randn(n, HKV, D, generator=g))
        table = pool.allocate(-(-n // 4))
        slots = cache.slot_mapping(table, 0, cached)
        cache.k[0][slots] = full_k[-1][:cached]
        cache.v[0][slots] = full_v[-1][:cached]
        slices.append(SequenceSlice(cached, new, table))
    assert any(len(s.block_table.ranges) > 1 for s in slices)
    qs = [torch.randn(new, HQ, D, generator=g) for _, new in shapes]
    q = torch.cat(qs)
    k = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, shapes)])
    v = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, shapes)])
    meta = PagedAttention.build(cache, D**-0.5, slices)
    assert meta.num_decode_tokens == 3
    out = meta.attend(0, q, k, v)
    start = 0
    for qi, fk, fv, (cached, new) in zip(qs, full_k, full_v, shapes):
        ref = dense_attention(qi, fk, fv, q_start=cached, k_start=0, scale=D**-0.5)
        torch.testing.assert_close(out[start:start + new], ref, rtol=1e-5, atol=1e-5)
        start += new
    # The new K/V were stored where the sequences' tables say.
    for s, fk in zip(slices, full_k):
        assert torch.equal(cache.k[0][cache.slot_mapping(s.block_table, 0, s.num_tokens)], fk)


def test_decode_rows_must_come_first():
    layout = KVLayout(1, HKV, D, torch.float32)
    pool = BlockPool(8, 4)
    cache = PagedKVCache(layout, 8, 4)
    slices = [SequenceSlice(0, 5, pool.allocate(2)), SequenceSlice(3, 1, pool.allocate(1))]
    try:
        PagedAttention.build(cache, 1.0, slices)
    except ValueError as e:
        assert "first" in str(e)
    else:
        raise AssertionError("a decode row after a prefill segment was accepted")
