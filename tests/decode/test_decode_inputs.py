"""The persistent decode buffers (staged rows, padding, the buffered forward) and the
warm-up's dry forward, on CPU."""

from __future__ import annotations

import torch

from disagg.attention.paged import PagedAttention, SequenceSlice
from disagg.decode.cuda_graphs import DecodeGraphs, DecodeInputs, graph_batch_sizes
from disagg.decode.runner import ModelRunner
from disagg.decode.scheduler import ScheduledSequence
from disagg.kv.block_pool import BlockPool
from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.models.loader import ModelSource, load_model
from disagg.sampling import SamplingParams


def test_graph_batch_sizes():
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert graph_batch_sizes(3) == (1, 2, 3)


def test_buffered_forward_equals_eager_build_and_padding_stores_nothing():
    model = load_model(ModelSource(name="tiny-llama", random_config="tiny-llama", seed=0))
    layout = KVLayout.of_model(model)
    pool, block = BlockPool(64, 4), 4
    cache = PagedKVCache(layout, 64, block)
    g = torch.Generator().manual_seed(0)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randn(t.shape, generator=g))
    fragments = [pool.allocate(1) for _ in range(64)]
    for t in fragments[::2]:
        pool.free(t)  # tables of several ranges
    params = SamplingParams(temperature=0.0)
    seqs = [ScheduledSequence(f"r{i}", (5 + i,), n, pool.allocate(-(-(n + 1) // block)), 0,
                              params, i) for i, n in enumerate([3, 17, 0])]
    assert any(len(s.block_table.ranges) > 1 for s in seqs)
    inputs = DecodeInputs(cache, 4)
    inputs.stage(seqs, 4)  # one padded row
    assert inputs.context_lens.tolist() == [4, 18, 1, 0]
    assert inputs.tokens[2, 3] == -1
    for b, s in enumerate(seqs):
        n = -(-(s.num_computed_tokens + 1) // block)
        assert inputs.block_tables[b, :n].tolist() == s.block_table.block_ids[:n]
    before = [k.clone() for k in cache.k]
    logits = DecodeGraphs(model, inputs, (4,)).forward(4)
    stored = [k.clone() for k in cache.k]
    for k, k0 in zip(cache.k, before):
        k.copy_(k0)
    meta = PagedAttention.build(cache, model.scale, [
        SequenceSlice(s.num_computed_tokens, 1, s.block_table) for s in seqs])
    hidden = model(torch.tensor([s.token_ids[0] for s in seqs]),
                   torch.tensor([s.num_computed_tokens for s in seqs]), meta)
    torch.testing.assert_close(logits[:3], model.compute_logits(hidden), rtol=1e-5, atol=1e-5)
    # The padded row stored nothing: both forwards changed exactly the same rows.
    for k, k_ref in zip(stored, cache.k):
        assert torch.equal(k != 0, k_ref != 0) and torch.allclose(k, k_ref, atol=1e-6)


def test_dry_forward_touches_no_kv():
    model = load_model(ModelSource(name="tiny-llama", random_config="tiny-llama", seed=0))
    cache = PagedKVCache(KVLayout.of_model(model), 8, 4)
    for t in (*cache.k, *cache.v):
        t.normal_()
    before = [t.clone() for t in (*cache.k, *cache.v)]
    runner = ModelRunner(model, cache, max_num_seqs=4)
    logits = runner.dry_forward(2, 15)
    assert logits.shape == (1, model.config.vocab_size) and logits.isfinite().all()
    assert all(torch.equal(a, b) for a, b in zip(before, (*cache.k, *cache.v)))
