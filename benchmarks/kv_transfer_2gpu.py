"""KV hand-off between two GPUs: GB/s of the ``nccl`` backend against raw NCCL send/recv.

Two processes: decode here (``--decode-device``, a ``PagedKVCache`` sized for the largest
payload) and prefill spawned (``--prefill-device``), both on one host. A request's KV has the
shape of ``--num-layers`` layers of ``--num-kv-heads`` x ``--head-dim`` rows (default
Llama-3.1-8B, bf16: 128 KiB a token), so a payload of P bytes is P / 128 KiB tokens; its
destination is ``--num-runs`` block ranges laid out in reverse order (a fragmented pool).

Per payload, interleaved, after ``--warmup`` rounds, ``--repeats`` timed rounds of each:
- ``nccl`` (the backend): prefill times from a device sync before ``open`` to ``finish``
  returning -- every layer already computed, so this is the transfer alone: one store round
  trip to announce, a header and run lengths per layer, K and V per run, received straight
  into the pool rows by decode's pairing thread. Decode then polls DONE. The pairing forms in
  the first warm-up round, never in a timed one.
- ``raw_nccl`` (the baseline): the same bytes as one contiguous K and V message per layer on a
  plain 2-rank ``ProcessGroupNCCL`` between the same processes, receives posted in advance.
The first round of each payload checks the received rows bit for bit (an integer sum per
layer and run on both sides). GB/s = payload bytes / median seconds / 1e9.

    python -m benchmarks.kv_transfer_2gpu                  # two GPUs: 1..16 GiB
    python -m benchmarks.kv_transfer_2gpu --device cpu --backend gloo --sizes-mib 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import add_provenance_args, print_table, write_results
from disagg.kv.block_pool import BlockRange, BlockTable
from disagg.kv.layout import KVFingerprint, KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.transport.base import KVCompletion, KVDestination, KVHeader, TransferStatus
from disagg.transport.torch_dist import TorchDistKVReceiver, TorchDistKVSender
from disagg.transport.torch_dist_channel import Channel, td

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def checksums(k: list[torch.Tensor], v: list[torch.Tensor], runs) -> list[int]:
    """Integer sums of every layer's K and V rows per run, on the tensors' device."""
    out = []
    for kl, vl in zip(k, v):
        for slot, _, n in runs:
            for t in (kl[slot:slot + n], vl[slot:slot + n]):
                ints = t.view(torch.int16 if t.element_size() == 2 else torch.int32)
                out.append(int(ints.to(torch.int64).sum()))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_process(conn, args) -> None:
    """Prefill: holds every layer's K/V for the largest payload; times what decode asks."""
    device = torch.device(args.prefill_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    layout = KVLayout(args.num_layers, args.num_kv_heads, args.head_dim, DTYPES[args.dtype])
    max_tokens = max_tokens_of(args, layout)
    g = torch.Generator(device).manual_seed(0)
    shape = (max_tokens, *layout.row_shape)
    k = [torch.randn(shape, generator=g, device=device).to(layout.dtype)
         for _ in range(layout.num_layers)]
    v = [torch.randn(shape, generator=g, device=device).to(layout.dtype)
         for _ in range(layout.num_layers)]
    sender = TorchDistKVSender(args.backend, device=device, timeout_s=args.timeout_s)
    raw = None
    while (cmd := conn.recv())[0] != "stop":
        if cmd[0] == "raw_store":
            raw = Channel(args.backend, dist.PrefixStore("raw/", dist.TCPStore(
                cmd[1], cmd[2], is_master=False, timeout=td(args.timeout_s))), 0, device,
                args.timeout_s)
            with raw.on_stream():  # NCCL connects on the first message, both sides at once
                raw.wait([raw.send(raw.ints([1]))], time.monotonic() + args.timeout_s)
            continue
        n = cmd[2] if cmd[0] == "raw" else cmd[1][4]
        ks, vs = [t[:n] for t in k], [t[:n] for t in v]
        sync(device)
        t0 = time.perf_counter()
        if cmd[0] == "raw":
            with raw.on_stream():
                works = [raw.send(t) for pair in zip(ks, vs) for t in pair]
                raw.wait(works, time.monotonic() + args.timeout_s)
            sync(device)
            conn.send([time.perf_counter() - t0])
            continue
        dest = KVDestination.from_list(cmd[1])
        writer = sender.open(dest, num_layers=layout.num_layers)
        for layer in range(layout.num_layers):
            writer.write_layer(layer, ks[layer], vs[layer])
        fingerprint = KVFingerprint("bench", str(layout.dtype), layout.tag, "dense", n)
        completion = writer.finish(KVHeader(dest.request_id, fingerprint, 0))
        seconds = time.perf_counter() - t0
        token_runs = [(token, token, m) for _, token, m in dest.runs]
        sums = checksums(ks, vs, token_runs) if cmd[2] else []
        conn.send([seconds, completion.num_bytes, completion.num_layers, sums])
    sender.close()


def max_tokens_of(args, layout: KVLayout) -> int:
    return max(args.sizes_mib) * 2**20 // layout.bytes_per_token


def block_table(num_tokens: int, num_runs: int, block_size: int) -> BlockTable:
    """``num_runs`` ranges covering ``num_tokens``, placed in reverse order in the pool."""
    num_blocks = -(-num_tokens // block_size)
    per_run = -(-num_blocks // num_runs)
    sizes = [min(per_run, num_blocks - i * per_run) for i in range(num_runs)]
    sizes = [s for s in sizes if s > 0]
    starts = [sum(sizes[i + 1:]) for i in range(len(sizes))]
    return BlockTable(tuple(BlockRange(s, n) for s, n in zip(starts, sizes)))


def one_backend_round(receiver, cache, conn, num_tokens: int, blocks: BlockTable,
                      check: bool, timeout_s: float) -> float:
    rid = f"r{time.monotonic_ns()}"
    runs = tuple(blocks.slot_runs(cache.block_size, 0, num_tokens))
    dest = receiver.destination(rid, runs, num_tokens, ttl_s=600.0)
    conn.send(["kv", dest.to_list(), check])
    seconds, num_bytes, num_layers, sums = conn.recv()
    fingerprint = KVFingerprint("bench", str(cache.layout.dtype), cache.layout.tag, "dense",
                                num_tokens)
    receiver.complete(KVCompletion(KVHeader(rid, fingerprint, 0), receiver.backend, num_bytes,
                                   num_layers, 0.0))
    deadline = time.monotonic() + timeout_s
    while (result := receiver.poll(rid)).status is TransferStatus.PENDING:
        if time.monotonic() > deadline:
            raise RuntimeError(f"KV of {num_tokens} tokens still pending after {timeout_s} s")
        time.sleep(0.0005)
    if result.status is not TransferStatus.DONE:
        raise RuntimeError(f"KV transfer ended {result}")
    if check and checksums(cache.k, cache.v, runs) != sums:
        raise RuntimeError(f"KV of {num_tokens} tokens arrived corrupted")
    receiver.release(rid)
    return seconds


def one_raw_round(raw: Channel, cache, conn, num_tokens: int, timeout_s: float) -> float:
    with raw.on_stream():
        works = [raw.recv(t[:num_tokens]) for pair in zip(cache.k, cache.v) for t in pair]
        conn.send(["raw", None, num_tokens])
        seconds = conn.recv()[0]
        raw.wait(works, time.monotonic() + timeout_s)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                        help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--prefill-device", default=None, help="default: cuda:0 (or cpu)")
    parser.add_argument("--decode-device", default=None, help="default: cuda:1 (or cpu)")
    parser.add_argument("--sizes-mib", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-runs", type=int, default=4, help="block ranges per request")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    add_provenance_args(parser)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.backend = args.backend or ("nccl" if gpu else "gloo")
    args.prefill_device = args.prefill_device or ("cuda:0" if gpu else "cpu")
    args.decode_device = args.decode_device or ("cuda:1" if gpu else "cpu")
    rows = run(args)
    name = "kv_handoff_2gpu" if gpu else "kv_handoff_2gpu_cpu"  # a CPU run never overwrites
    path = write_results(name, rows, commit=args.commit, dirty=args.dirty, out=args.out,
                         extra={"layout": [args.num_layers, args.num_kv_heads, args.head_dim,
                                           args.dtype], "num_runs": args.num_runs,
                                "prefill_device": args.prefill_device,
                                "decode_device": args.decode_device})
    print(f"wrote {path}")
    print_table(rows, ["setup", "backend", "payload_bytes", "gbps", "median_s", "min_s"])


def run(args) -> list[dict]:
    device = torch.device(args.decode_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    layout = KVLayout(args.num_layers, args.num_kv_heads, args.head_dim, DTYPES[args.dtype])
    max_tokens = max_tokens_of(args, layout)
    cache = PagedKVCache(layout, -(-max_tokens // args.block_size) + args.num_runs,
                         args.block_size, device=device)
    receiver = TorchDistKVReceiver(args.backend, device=device, host="127.0.0.1",
                                   timeout_s=args.timeout_s)
    receiver.attach(cache)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=prefill_process, args=(child, args), daemon=True)
    proc.start()
    raw_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=td(args.timeout_s))
    conn.send(["raw_store", "127.0.0.1", raw_store.port])
    raw = Channel(args.backend, dist.PrefixStore("raw/", raw_store), 1, device, args.timeout_s)
    with raw.on_stream():
        raw.recv_ints(1, time.monotonic() + args.timeout_s)
    setup = "2gpu" if device.type == "cuda" else "cpu"
    rows = []
    try:
        for size_mib in args.sizes_mib:
            n = size_mib * 2**20 // layout.bytes_per_token
            blocks = block_table(n, args.num_runs, args.block_size)
            times: dict[str, list[float]] = {args.backend: [], f"raw_{args.backend}": []}
            for i in range(args.warmup + args.repeats):
                t_backend = one_backend_round(receiver, cache, conn, n, blocks, i == 0,
                                              args.timeout_s)
                t_raw = one_raw_round(raw, cache, conn, n, args.timeout_s)
                if i >= args.warmup:
                    times[args.backend].append(t_backend)
                    times[f"raw_{args.backend}"].append(t_raw)
            payload = n * layout.bytes_per_token
            for backend, ts in times.items():
                median = statistics.median(ts)
                rows.append({"setup": setup, "backend": backend, "payload_bytes": payload,
                             "num_tokens": n, "gbps": payload / median / 1e9,
                             "median_s": median, "min_s": min(ts), "repeats": len(ts)})
        assert receiver.num_pairings_formed == 1, "the backend re-paired during the run"
    finally:
        conn.send(["stop"])
        proc.join(30)
        receiver.close()
        raw.close()
    return rows


if __name__ == "__main__":
    main()
