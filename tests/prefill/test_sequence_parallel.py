"""Sequence-parallel prefill on CPU: gloo groups of 2 and 3 processes against one process.

Every rank writes its own rows of a decode pool (shared memory, the ``inprocess`` backend,
scattered runs) and rank 0 samples token 0: the pool's rows and token 0's logits must equal a
single-process prefill's (DESIGN.md section 7: logits within 1e-4 of max |logit|), for dense,
Triangle-only and mixed layer sets, lengths no rank count divides, and chunks shorter than
the window (the halo then spans several chunks, the sinks and the last rows too). Then the
group's failure rules: a rank whose KV write fails stops every rank at the same check, and a
rank that dies fails its peers' next collective within the deadline.
"""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from disagg_kernels.triangle_mix import TriangleParams
from helpers import LogitsCapture, random_model, rel_err_max

from disagg.attention.triangle import TriangleMixConfig
from disagg.kv.layout import PackedKV
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.sequence_parallel import SequenceParallelPrefill, merge_completions
from disagg.prefill.sp_attention import SPRankFailed
from disagg.prefill.sp_comm import SPCollectiveError, TorchDistCollectives
from disagg.prefill.sp_plan import ZigzagPlan
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.base import KVDestination, KVHeader
from disagg.transport.direct import INPROCESS, DirectKVReceiver, DirectKVSender

SMALL = TriangleParams(n_sink=4, n_window=32, n_last=16)
WIDE = TriangleParams(n_sink=16, n_window=32, n_last=24)  # sinks and last rows span chunks
CASES = [  # (name, Triangle layers, params, prompt length)
    ("dense", None, SMALL, 67),
    ("triangle", (0, 1, 2, 3), SMALL, 203),
    ("mixed", (2, 3), SMALL, 151),
    ("short_chunks", (1, 2, 3), WIDE, 77),
]
SEED = 3


def trianglemix(layers, params):
    return None if layers is None else TriangleMixConfig(layers, params)


def runs_for(n: int) -> tuple[tuple[int, int, int], ...]:
    """Two scattered runs over a pool of ``n + 8`` rows (the second half first)."""
    half = n // 2 + 1
    return ((n - half + 8, 0, half), (0, half, n - half))


def request_for(n: int) -> EngineRequest:
    ids = torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    return EngineRequest.create(f"r{n}", ids, SamplingParams(temperature=0.0, max_tokens=2),
                                vocab_size=512, context=4096)


def _rank_main(rank, world, store_file, pools, logits, outcomes):
    torch.set_num_threads(1)
    # A file rendezvous: no port is picked here and bound later (another process can take it).
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                            world_size=world)
    model, source = random_model("tiny-llama", seed=SEED)
    capture = LogitsCapture(model)
    comm = TorchDistCollectives(None, timeout_s=20.0)
    for i, (_, layers, params, n) in enumerate(CASES):
        engine = PrefillEngine(capture, model_name=source.name,
                               trianglemix=trianglemix(layers, params),
                               senders=(DirectKVSender(INPROCESS),))
        receiver = DirectKVReceiver(INPROCESS)
        receiver.attach(SimpleNamespace(k=pools[i][0], v=pools[i][1], device="cpu"))
        request = request_for(n)
        dest = receiver.destination(request.request_id, runs_for(n), n, ttl_s=60.0)
        sp = SequenceParallelPrefill(engine, comm, check_every=2)
        writer = sp.open_writer((dest,))
        result = sp.prefill(request, writer)
        header = KVHeader(request.request_id, engine.fingerprint(n), 0)
        completion = writer.finish(header)
        gathered = [None] * world
        dist.all_gather_object(gathered, completion)
        if rank == 0:
            logits[i] = capture.logits[0]
            merged = merge_completions(gathered)
            outcomes[i] = merged.num_bytes == engine.layout.bytes_per_token * n
            outcomes[i] &= result.first_token.token_id == int(capture.logits[0].argmax())
    # A rank whose KV write fails: every rank stops at the same check with SPRankFailed.
    n = 90
    engine = PrefillEngine(capture, model_name=source.name)
    sp = SequenceParallelPrefill(engine, comm, check_every=2)
    sink = PackedKV.empty(engine.layout, sp.plan(n).num_local(rank), "cpu")
    if rank == 1:
        def broken(layer, k, v):
            raise RuntimeError("decode pool gone")
        sink.write_layer = broken
    try:
        sp.prefill(request_for(n), sink)
    except SPRankFailed as e:
        outcomes[len(CASES) + rank] = rank != 1 or "decode pool gone" in str(e)
    # A rank that dies: its peers' next collective fails within the deadline.
    dist.barrier()
    if rank == world - 1:
        os._exit(0)
    sp = SequenceParallelPrefill(engine, TorchDistCollectives(None, timeout_s=3.0))
    try:
        sp.prefill(request_for(n))
    except SPCollectiveError:
        outcomes[len(CASES) + world + rank] = True
    # The outcomes are in shared memory. Leave without the interpreter's teardown: a gloo
    # worker thread may still wait on the dead peer, and destroying it aborts the process
    # ("terminate called without an active exception"; seen in CI as an sp3 setup error).
    os._exit(0)


@pytest.fixture(scope="module")
def single_process():
    """Single-process prefill of every case: (KV, token 0's logits)."""
    model, source = random_model("tiny-llama", seed=SEED)
    capture = LogitsCapture(model)
    out = []
    for _, layers, params, n in CASES:
        engine = PrefillEngine(capture, model_name=source.name,
                               trianglemix=trianglemix(layers, params))
        result = engine.prefill(request_for(n))
        out.append((result.kv, capture.logits[0].clone()))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["sp2", "sp3"])
def sp_run(request, single_process, tmp_path_factory):
    world = request.param
    pools = []
    for (kv, _), (_, _, _, n) in zip(single_process, CASES):
        shape = (n + 8, *kv.k[0].shape[1:])
        pools.append(tuple([torch.full(shape, float("nan")).share_memory_()
                            for _ in kv.k] for _ in range(2)))
    logits = torch.zeros(len(CASES), 512).share_memory_()
    outcomes = torch.zeros(len(CASES) + 2 * world, dtype=torch.bool).share_memory_()
    store_file = tmp_path_factory.mktemp(f"sp{world}") / "rendezvous"
    mp.spawn(_rank_main, args=(world, store_file, pools, logits, outcomes), nprocs=world,
             join=True)
    return world, pools, logits, outcomes


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_kv_and_first_token_logits_equal_single_process(sp_run, single_process, case):
    _, pools, logits, outcomes = sp_run
    kv, ref_logits = single_process[case]
    n = CASES[case][3]
    assert rel_err_max(logits[case], ref_logits) < 1e-4
    assert outcomes[case], "token 0 or the merged completion's bytes are wrong"
    for layer in range(len(kv.k)):
        for pool, ref in ((pools[case][0][layer], kv.k[layer]), (pools[case][1][layer],
                                                                 kv.v[layer])):
            rows = torch.cat([pool[slot:slot + m] for slot, _, m in runs_for(n)])
            ordered = torch.cat([ref[t:t + m] for _, t, m in runs_for(n)])
            assert not rows.isnan().any(), f"layer {layer}: a row was never written"
            assert rel_err_max(rows, ordered) < 1e-4, f"layer {layer}"


def test_a_failed_write_stops_every_rank_and_a_dead_rank_fails_its_peers(sp_run):
    world, _, _, outcomes = sp_run
    failed = outcomes[len(CASES):len(CASES) + world]
    assert failed.all(), f"SPRankFailed on every rank (the cause named): {failed.tolist()}"
    peers = outcomes[len(CASES) + world:len(CASES) + 2 * world - 1]
    assert peers.all(), f"SPCollectiveError on the dead rank's peers: {peers.tolist()}"


@pytest.mark.parametrize("n, world", [(1, 2), (7, 2), (67, 3), (1000, 4), (13, 8)])
def test_zigzag_plan_covers_the_prompt_and_balances_it(n, world):
    plan = ZigzagPlan(n, world)
    spans = plan.chunk_spans
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    sizes = [e - s for s, e in spans]
    assert max(sizes) - min(sizes) <= 1
    assert plan.positions(0)[-1] == n - 1  # rank 0 samples token 0
    everyone = torch.cat([plan.positions(r) for r in range(world)])
    assert torch.equal(everyone.sort().values, torch.arange(n))
    # gather_index finds every position in a rank-major padded gather of local rows
    padded = torch.full((world, plan.max_local), -1, dtype=torch.int64)
    for r in range(world):
        padded[r, :plan.num_local(r)] = plan.positions(r)
    assert torch.equal(padded.flatten()[plan.gather_index(n)], torch.arange(n))
    dest = KVDestination("r", INPROCESS, "e", runs_for(n) if n > 1 else ((5, 0, 1),), n, 1e18)
    slots = {}
    for r in range(world):
        shard = plan.shard_destination(dest, r)
        assert shard.num_prompt_tokens == plan.num_local(r)
        pos = plan.positions(r)
        for slot, token, m in shard.runs:
            for i in range(m):
                slots[int(pos[token + i])] = slot + i
    expected = {t + i: slot + i for slot, t, m in dest.runs for i in range(m)}
    assert slots == expected
