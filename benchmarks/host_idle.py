"""What idle costs a request on this host, with no Ray, no Serve and no model: two processes on
one machine, a client that sends a 32K-token-id JSON body over a localhost TCP connection and a
server that reads it, parses it and answers one byte.

The served benchmark (``benchmarks.served_decode``) finds that a 32K request after a few seconds
of idle spends ~3-12 ms more outside the prefill than one sent back to back. This measures the
same pattern on a bare path: each round trip after the idle seconds ``--idle`` names
(default 0,0,5,0,30,0), ``--rounds`` times (the very first request is left out of the
medians: it is the path's first use). If the bare path pays after idle
what the served path pays, the cost is the host's (cores that slept, cold caches), not one the
service's code could remove.

    python -m benchmarks.host_idle [--idle 0,0,5,0,30,0] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import socket
import statistics
import struct
import time

from benchmarks.common import add_provenance_args, write_results


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _serve(listener: socket.socket) -> None:
    """Answer each length-prefixed JSON body with one byte after parsing it."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        header = conn.recv(8, socket.MSG_WAITALL)
        if len(header) < 8:
            return
        (n,) = struct.unpack("!Q", header)
        body = json.loads(_recv_exact(conn, n))
        conn.sendall(b"1" if len(body["prompt"]) else b"0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--idle", default="0,0,5,0,30,0",
                        help="idle seconds before each request, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    add_provenance_args(parser)
    args = parser.parse_args()
    idle = [float(x) for x in args.idle.split(",")]
    rng = random.Random(0)
    body = json.dumps({"prompt": [rng.randrange(128256) for _ in range(args.tokens)]}).encode()
    listener = socket.create_server(("127.0.0.1", 0))
    server = mp.get_context("spawn").Process(target=_serve, args=(listener,), daemon=True)
    server.start()
    conn = socket.create_connection(listener.getsockname())
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rows = []
    for _ in range(args.rounds):
        for seconds in idle:
            time.sleep(seconds)
            t0 = time.perf_counter()
            conn.sendall(struct.pack("!Q", len(body)) + body)
            assert conn.recv(1) == b"1"
            rows.append({"idle_s": seconds, "round_trip_ms": (time.perf_counter() - t0) * 1e3})
    conn.close()
    server.join(timeout=10)
    summary = {}
    for seconds in sorted(set(idle)):
        picked = [r for r in rows[1:] if r["idle_s"] == seconds]  # the very first is warm-up
        summary[str(seconds)] = statistics.median(r["round_trip_ms"] for r in picked)
    write_results("host_idle", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                  extra={"tokens": args.tokens, "body_bytes": len(body),
                         "median_by_idle_s": summary})
    print(f"{'idle (s)':>10s} {'round trip (ms), median':>24s}  every one")
    for seconds, median in summary.items():
        every = " ".join(f"{r['round_trip_ms']:.2f}" for r in rows if r["idle_s"] == float(seconds))
        print(f"{seconds:>10s} {median:24.2f}  {every}")


if __name__ == "__main__":
    main()
