"""Sequence-parallel prefill: per-rank work on one GPU and the projected TTFT, or a measured
run over real ranks.

    python -m benchmarks.sequence_parallel [--lengths 32768 131072] [--sp 2 4 8]
    python -m benchmarks.sequence_parallel --measured --sp 2      # one process per GPU, NCCL

Projection (default; ``source: projected``). Random weights of a named config (Llama-3.1-8B),
bf16, token-id prompts (seed 0), dense and TriangleMix (the published split). For every
length: SP=1 measured (the single-device engine, same process), then for each SP degree the
code path of every rank (``SequenceParallelPrefill`` over ``LoopbackCollectives``: the rank's
real kernels and shapes, its collectives' local work, no bytes between devices) timed one
rank after another on the GPU. A rank's first run at a new shape may include one-time costs
(Triton compiles, cuDNN plans), so the slowest rank is timed again until the slowest time
is one seen twice. Exact bytes each rank receives per dense and per Triangle layer are
counted by the collectives and checked against ``exchanged_bytes`` (the formula used for 1M).
Projected TTFT = slowest rank's work + every exchanged byte at ``--link-gbps`` (369 GB/s:
NCCL send/recv measured between two H200s), none assumed hidden under compute (the dense
all-gather is in fact overlapped with the diagonal blocks, so this is pessimistic).
Parallel efficiency = SP=1 / (SP x projected). 1M tokens: SP=1's work fitted as
``a N + b N^2`` through the 32K and 128K points, divided by SP times the overhead each SP degree
showed at 128K, plus the 1M bytes (``million_rows``; the KV of 1M tokens is 128 GiB, so SP=1
is a reference line, not a configuration that fits one GPU).

Measured (``--measured``; ``source: measured``): ``--sp`` ranks as processes, NCCL on one GPU
each (gloo on CPU with ``--device cpu``), the process group made once, one warm-up prefill per
length, then wall clock from a barrier to the last rank's end; SP=1 on rank 0 alone first.
Results: ``benchmarks/results/sequence_parallel.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
from disagg_kernels.triangle_mix import TriangleParams

from benchmarks.common import add_provenance_args, print_table, write_results
from benchmarks.sp_collectives import LoopbackCollectives
from disagg.attention.metadata import AttentionKind
from disagg.attention.triangle import TriangleMixConfig, published_trianglemix
from disagg.kv.layout import KVLayout
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.sequence_parallel import SequenceParallelPrefill
from disagg.prefill.sp_comm import all_reduce_bytes
from disagg.prefill.sp_plan import ZigzagPlan
from disagg.request import EngineRequest

COLUMNS = ["context_tokens", "mode", "sp", "source", "ttft_s", "speedup_vs_sp1",
           "parallel_efficiency", "slowest_rank_s", "comm_s", "exchanged_bytes_dense_layer",
           "exchanged_bytes_triangle_layer", "peak_gib_per_gpu"]
ONE_MILLION = 1 << 20


def exchanged_bytes(num_tokens: int, world: int, layout: KVLayout, num_heads: int,
                    params: TriangleParams | None) -> tuple[int, int]:
    """Bytes the busiest rank receives per (dense layer, Triangle layer): what
    ``SPPrefillAttention`` sends through its collectives, by the same count."""
    if world == 1:
        return 0, 0
    elt = torch.empty((), dtype=layout.dtype).element_size()
    row = layout.num_kv_heads * layout.head_dim * elt  # one K or V row
    dense = (world - 1) * ZigzagPlan(num_tokens, world).max_local * 2 * row
    if params is None:
        return dense, 0
    last = num_tokens - params.first_last_row(num_tokens)
    halo = (world - 1) * 2 * (params.n_sink + params.n_window - 1) * 2 * row
    q_last = last * num_heads * layout.head_dim
    lse = num_heads * last * 4
    triangle = (halo + all_reduce_bytes(q_last * elt, world) + all_reduce_bytes(lse, world)
                + all_reduce_bytes(q_last * 4 + lse, world))
    return dense, triangle


def _num_triangle_layers(engine: PrefillEngine, num_tokens: int) -> int:
    tm = engine.trianglemix
    return 0 if tm is None else sum(tm.kind(i, num_tokens) is AttentionKind.TRIANGLE
                                    for i in range(engine.model.config.num_layers))


def make_request(n: int, vocab: int) -> EngineRequest:
    return EngineRequest.random_prefill(f"sp-{n}", n, vocab_size=vocab, context=max(n + 1, 2))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple[float, float]:
    """(seconds, peak GiB allocated) of one call."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return time.perf_counter() - t0, peak


def project(engine: PrefillEngine, request: EngineRequest, world: int, check) -> dict:
    """Every rank's work one after another; the slowest re-timed until seen twice."""
    device = engine.device
    results = {}

    def run(rank):
        sp = SequenceParallelPrefill(engine, LoopbackCollectives(rank, world))
        out = {}
        seconds, peak = _timed(lambda: out.setdefault("r", sp.prefill(request)), device)
        return seconds, peak, out["r"].layer_bytes

    for rank in range(world):
        results[rank] = [run(rank)]
    for _ in range(2):
        slowest = max(results, key=lambda r: min(t for t, _, _ in results[r]))
        if len(results[slowest]) > 1:
            break
        results[slowest].append(run(slowest))
    rank_s = [min(t for t, _, _ in results[r]) for r in range(world)]
    layer_bytes = [results[r][0][2] for r in range(world)]
    dense_bytes = max(b.dense for b in layer_bytes)
    triangle_bytes = max(b.triangle for b in layer_bytes)
    check(dense_bytes, triangle_bytes)
    return {"rank_s": rank_s, "slowest_rank_s": max(rank_s),
            "peak_gib_per_gpu": max(p for r in results.values() for _, p, _ in r),
            "exchanged_bytes_dense_layer": dense_bytes,
            "exchanged_bytes_triangle_layer": triangle_bytes}


def build(args, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = ModelSource(name=f"random:{args.model}", random_config=args.model, seed=0)
    model = load_model(source, device=device, dtype=dtype)
    if args.triangle_layers:
        tm = TriangleMixConfig(tuple(args.triangle_layers), TriangleParams(*args.triangle_params))
    else:
        tm = published_trianglemix(args.model, TriangleParams(*args.triangle_params))
    engines = {"trianglemix": PrefillEngine(model, model_name=source.name, trianglemix=tm),
               "dense": PrefillEngine(model, model_name=source.name)}
    return model, engines


def projected_rows(args) -> list[dict]:
    device = torch.device(args.device)
    model, engines = build(args, device)
    config = model.config
    rows = []
    for n in args.lengths:
        request = make_request(n, config.vocab_size)
        for mode, engine in engines.items():
            params = engine.trianglemix.params if engine.trianglemix else None
            num_tri = _num_triangle_layers(engine, n)
            num_dense = config.num_layers - num_tri
            if n == args.lengths[0]:
                engine.prefill(request)  # first call: cuBLAS/cuDNN handles, compiles
            sp1_s, sp1_peak = _timed(lambda e=engine, r=request: e.prefill(r), device)
            rows.append(_row(n, mode, 1, sp1_s, 0.0, sp1_s, 0, 0, sp1_peak, sp1_s))
            print(rows[-1], flush=True)
            for world in args.sp:
                expected = exchanged_bytes(n, world, engine.layout, config.num_heads,
                                           params if num_tri else None)

                def check(dense, tri, expected=expected, world=world):
                    if (dense, tri) != expected:
                        raise AssertionError(f"SP={world}: counted bytes {(dense, tri)} differ "
                                             f"from exchanged_bytes {expected}")

                p = project(engine, request, world, check)
                comm_s = (num_dense * expected[0] + num_tri * expected[1]) / (args.link_gbps * 1e9)
                rows.append(_row(n, mode, world, p["slowest_rank_s"] + comm_s, comm_s,
                                 p["slowest_rank_s"], *expected, p["peak_gib_per_gpu"], sp1_s,
                                 rank_s=p["rank_s"]))
                print(rows[-1], flush=True)
            write_results("sequence_parallel", rows, commit=args.commit, dirty=args.dirty,
                          out=args.out, extra=_extra(args))
    return rows + million_rows(args, rows, engines, config)


def million_rows(args, rows, engines, config) -> list[dict]:
    """1M tokens, per (mode, SP degree): SP=1's work ``a N + b N^2`` through its two longest
    measured lengths; SP=W's rank work = that / W x the overhead measured at the longest
    length (W x slowest rank / SP=1 there), plus the 1M bytes at the link rate."""
    if len(args.lengths) < 2:
        return []
    n1, n2 = sorted(args.lengths)[-2:]
    out = []
    for mode, engine in engines.items():
        params = engine.trianglemix.params if engine.trianglemix else None
        num_tri = _num_triangle_layers(engine, ONE_MILLION)
        slowest = {(r["context_tokens"], r["sp"]): r["slowest_rank_s"] for r in rows
                   if r["mode"] == mode}
        b = (slowest[n2, 1] / n2 - slowest[n1, 1] / n1) / (n2 - n1)
        a = slowest[n1, 1] / n1 - b * n1
        if a < 0 or b < 0:  # noisy points (CPU): scale the longest one linearly instead
            a, b = slowest[n2, 1] / n2, 0.0
        sp1 = a * ONE_MILLION + b * ONE_MILLION**2
        for world in [1, *args.sp]:
            overhead = world * slowest[n2, world] / slowest[n2, 1]
            work = sp1 / world * overhead
            dense, tri = exchanged_bytes(ONE_MILLION, world, engine.layout, config.num_heads,
                                         params if num_tri else None)
            comm_s = ((config.num_layers - num_tri) * dense + num_tri * tri) / (args.link_gbps * 1e9)
            out.append({"context_tokens": ONE_MILLION, "mode": mode, "sp": world,
                        "source": "projected", "ttft_s": work + comm_s, "slowest_rank_s": work,
                        "comm_s": comm_s, "exchanged_bytes_dense_layer": dense,
                        "exchanged_bytes_triangle_layer": tri, "peak_gib_per_gpu": None,
                        "speedup_vs_sp1": sp1 / (work + comm_s),
                        "parallel_efficiency": sp1 / (world * (work + comm_s)),
                        "fit": f"SP=1: a*N + b*N^2 through {n1} and {n2} tokens; SP={world}: "
                               f"/ {world} x {overhead:.3f} (its overhead at {n2})"})
    return out


def _row(n, mode, world, ttft_s, comm_s, slowest_s, dense_b, tri_b, peak, sp1_s, rank_s=None,
         source="projected") -> dict:
    row = {"context_tokens": n, "mode": mode, "sp": world,
           "source": "measured" if world == 1 else source, "ttft_s": ttft_s,
           "speedup_vs_sp1": sp1_s / ttft_s, "parallel_efficiency": sp1_s / (world * ttft_s),
           "slowest_rank_s": slowest_s, "comm_s": comm_s,
           "exchanged_bytes_dense_layer": dense_b, "exchanged_bytes_triangle_layer": tri_b,
           "peak_gib_per_gpu": peak}
    if rank_s is not None:
        row["rank_s"] = rank_s
    return row


def _extra(args) -> dict:
    note = ("every row measured: wall clock from a barrier to the last rank's end" if
            args.measured else "sp=1 rows are measured; sp>1 rows and 1M rows are projections "
            "(slowest rank's measured work + all exchanged bytes at link_gbps, none overlapped)")
    return {"model": f"random:{args.model}", "link_gbps": args.link_gbps,
            "triangle_params": list(args.triangle_params), "note": note}


def _measured_rank(rank: int, args, port: int, out: dict) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
        rank=rank, world_size=args.world, timeout=timedelta(seconds=args.timeout_s))
    from disagg.prefill.sp_comm import TorchDistCollectives

    model, engines = build(args, device)
    comm = TorchDistCollectives(None, timeout_s=args.timeout_s)
    rows = []
    for n in args.lengths:
        request = make_request(n, model.config.vocab_size)
        for mode, engine in engines.items():
            sp1_s = None
            if rank == 0:
                engine.prefill(request)
                sp1_s, peak1 = _timed(lambda e=engine, r=request: e.prefill(r), device)
                rows.append(_row(n, mode, 1, sp1_s, 0.0, sp1_s, 0, 0, peak1, sp1_s,
                                 source="measured"))
            sp = SequenceParallelPrefill(engine, comm)
            sp.prefill(request)  # warm-up at this length
            torch.distributed.barrier()
            result = {}
            seconds, peak = _timed(
                lambda sp=sp, r=request, out=result: out.setdefault("r", sp.prefill(r)), device)
            torch.distributed.barrier()
            stats = [None] * args.world
            torch.distributed.all_gather_object(stats, (seconds, peak))
            if rank == 0:
                b = result["r"].layer_bytes
                ttft = max(s for s, _ in stats)
                rows.append(_row(n, mode, args.world, ttft, 0.0, ttft, b.dense, b.triangle,
                                 max(p for _, p in stats), sp1_s, rank_s=[s for s, _ in stats],
                                 source="measured"))
                print(rows[-1], flush=True)
    if rank == 0:
        out["rows"] = rows
    torch.distributed.destroy_process_group()


def _measured_entry(rank, args, port, path):
    out = {}
    _measured_rank(rank, args, port, out)
    if rank == 0:
        torch.save(out["rows"], path)


def measured_rows(args) -> list[dict]:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (GPU.md)
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    path = os.path.join(tempfile.mkdtemp(), "rows.pt")
    mp.spawn(_measured_entry, args=(args, port, path), nprocs=args.world, join=True)
    return torch.load(path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="random config name")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--sp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--triangle-layers", type=int, nargs="*", default=None,
                        help="default: the model's published split")
    parser.add_argument("--triangle-params", type=int, nargs=3, default=[8, 512, 128],
                        metavar=("N_SINK", "N_WINDOW", "N_LAST"))
    parser.add_argument("--link-gbps", type=float, default=369.0)
    parser.add_argument("--measured", action="store_true",
                        help="real ranks (one process per GPU); --sp takes one degree")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    add_provenance_args(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.measured:
        if len(args.sp) != 1:
            parser.error("--measured runs one SP degree")
        args.world = args.sp[0]
        rows = measured_rows(args)
    else:
        rows = projected_rows(args)
    write_results("sequence_parallel", rows, commit=args.commit, dirty=args.dirty,
                  out=args.out, extra=_extra(args))
    print_table(rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
