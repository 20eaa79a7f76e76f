"""The paged decode kernels on CUDA (bf16) against the fp32 PyTorch reference.

Ragged batches with blocks scattered over the pool, GQA 32/8 (head dim 128, Llama-3.1-8B) and
9/3 (head dim 64, SmolLM2), contexts 1 to 128K, every output NaN-poisoned first; the decode
launch captured in a CUDA graph serves new lengths on replay.
"""

from __future__ import annotations

import pytest
import torch
from disagg_kernels.paged_decode import paged_decode_reference, store_kv_reference
from disagg_kernels.paged_decode.launcher import paged_decode_attention_triton, store_kv_triton

from disagg.attention.paged import chunk_attention

pytestmark = pytest.mark.gpu

BLOCK = 16  # the engine's default block size
BF16_REL_RMS = 5e-3  # STYLE.md: bf16 against an fp32 reference
SHAPES = [(32, 8, 128), (9, 3, 64)]


def _rel_rms(x, ref):
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _paged(lengths, hq, hkv, d, seed, spare_blocks=7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    num_blocks = sum(-(-n // BLOCK) for n in lengths) + spare_blocks
    k_cache = torch.randn(num_blocks * BLOCK, hkv, d, device="cuda", generator=g).bfloat16()
    v_cache = torch.randn(num_blocks * BLOCK, hkv, d, device="cuda", generator=g).bfloat16()
    q = torch.randn(len(lengths), hq, d, device="cuda", generator=g).bfloat16()
    width = max(-(-n // BLOCK) for n in lengths) + 3
    perm = torch.randperm(num_blocks, device="cuda", generator=g).int()  # scattered, unordered
    tables = torch.zeros(len(lengths), width, dtype=torch.int32, device="cuda")
    used = 0
    for b, n in enumerate(lengths):
        nb = -(-n // BLOCK)
        tables[b, :nb] = perm[used:used + nb]
        used += nb
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, tables, lens


def _check(lengths, hq, hkv, d, seed, **kw):
    q, kc, vc, tables, lens = _paged(lengths, hq, hkv, d, seed)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_triton(q, kc, vc, tables, lens, block_size=BLOCK, out=out, **kw)
    assert not out.isnan().any(), "unwritten output rows"
    ref = paged_decode_reference(q.float(), kc.float(), vc.float(), tables, lens,
                                 block_size=BLOCK)
    for b, n in enumerate(lengths):  # per row: a broken short row is not hidden by long ones
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        else:
            assert _rel_rms(out[b], ref[b]) <= BF16_REL_RMS, (b, n)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_ragged_scattered_batch(hq, hkv, d, num_splits):
    _check([1, 15, 16, 17, 1000, 4099, 0, 777, 2], hq, hkv, d, seed=d + hq,
           num_splits=num_splits)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
@pytest.mark.parametrize("context", [32768, 131072])
def test_one_long_sequence(hq, hkv, d, context):
    _check([context], hq, hkv, d, seed=context)


def test_batch_of_64_with_one_128k_sequence():
    lengths = [131072] + [(37 * i) % 5000 + 1 for i in range(63)]
    _check(lengths, 32, 8, 128, seed=64)


def test_captured_launch_serves_new_lengths():
    q, kc, vc, tables, lens = _paged([300, 5000, 17], 32, 8, 128, seed=1)
    out = torch.empty_like(q)
    paged_decode_attention_triton(q, kc, vc, tables, lens, block_size=BLOCK, out=out)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention_triton(q, kc, vc, tables, lens, block_size=BLOCK, out=out)
    lens.copy_(torch.tensor([4800, 1, 0], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    ref = paged_decode_reference(q.float(), kc.float(), vc.float(), tables, lens,
                                 block_size=BLOCK)
    assert _rel_rms(out[:2], ref[:2]) <= BF16_REL_RMS
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_store_kv_is_bit_exact():
    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(4096, 3, 64, device="cuda", generator=g).bfloat16()
    vc = torch.randn_like(kc)
    ref_k, ref_v = kc.clone(), vc.clone()
    k = torch.randn(100, 3, 64, device="cuda", generator=g).bfloat16()
    v = torch.randn_like(k)
    slots = torch.randperm(4096, device="cuda", generator=g)[:100]
    slots[::7] = -1
    store_kv_triton(k, v, kc, vc, slots)
    store_kv_reference(k, v, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_chunk_attention_lower_right(hq, hkv, d):
    g = torch.Generator(device="cuda").manual_seed(2)
    num_q, num_k = 300, 2000  # a later prefill chunk: queries at the end of the keys
    q = torch.randn(num_q, hq, d, device="cuda", generator=g).bfloat16()
    k = torch.randn(num_k, hkv, d, device="cuda", generator=g).bfloat16()
    v = torch.randn(num_k, hkv, d, device="cuda", generator=g).bfloat16()
    out = chunk_attention(q, k, v, scale=d**-0.5)
    rep = hq // hkv
    kf, vf = (x.float().repeat_interleave(rep, dim=1) for x in (k, v))
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * d**-0.5
    keep = torch.arange(num_k, device="cuda")[None, :] <= (num_k - num_q
                                                          + torch.arange(num_q, device="cuda"))[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vf)
    assert _rel_rms(out, ref) <= BF16_REL_RMS
