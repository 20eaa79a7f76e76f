"""PagedAttention over a mixed batch equals causal attention of each sequence, computed here by
an explicit fp64 softmax (not ``dense_attention``: ``paged.py`` calls it, so it would check
the code against itself)."""

from __future__ import annotations

import torch

from disagg.attention.paged import PagedAttention, SequenceSlice
from disagg.kv.block_pool import BlockPool
from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache

HQ, HKV, D = 6, 2, 16  # GQA 3:1


def naive_causal_attention(q, k, v, *, q_start: int, scale: float) -> torch.Tensor:
    """q ``[Tq, Hq, D]`` at positions ``q_start ..``, k/v ``[Tk, Hkv, D]`` at ``0 ..``: query
    head h reads KV head ``h // (Hq // Hkv)``; key j is visible to query i iff j <= i."""
    tq, hq, _ = q.shape
    group = hq // k.shape[1]
    i = torch.arange(q_start, q_start + tq)[:, None]
    visible = torch.arange(k.shape[0])[None, :] <= i
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(hq):
        scores = (q[:, h].double() @ k[:, h // group].double().T) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[:, h] = probs @ v[:, h // group].double()
    return out.to(q.dtype)


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
        ref = naive_causal_attention(qi, fk, fv, q_start=cached, scale=D**-0.5)
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
