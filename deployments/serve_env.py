"""Environment that Serve reads once per process, at import, and that this app sets for every
process on a request's path: the HTTP proxy (through the Ray instance the launcher starts)
and every replica (through its ``runtime_env``).

Each Serve router (the proxy's, and each replica's handle to the next role) routes on the
queue length each replica last reported, trusted for ``RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S``
(Serve's default: 10 s). Past that, the next request first asks the replica for its queue
length and waits for the answer: one more round trip on that hop. Long-prompt traffic is
sparse. On one H200, a 32K request after 12-15 s of idle had its decode -> prefill hop take
+2.0 ms over the request right after it at 10 s, and +0.5 ms at 600 s; its ingress -> decode
hop +0.3 ms at 10 s and +0.0 ms at 600 s (6 samples each, RESULTS.md). Every request a
replica accepts reports its queue length again, and a replica that is full rejects the
request, which the router then sends elsewhere. An old entry therefore costs at most a less
even pick at low load, never a request sent to a full replica, so the entries are trusted for
``QUEUE_LENGTH_CACHE_S``. A value set in the environment wins.

GPU replicas also start with ``gpu_env()``: CUDA loads each library's kernels lazily by
default, at a kernel's first launch. cuBLAS picks its GEMM kernels by the row count, so a
prompt of a length the warm-up did not run can load kernels inside a user's request. On one
H100, in the profiler's diff of a 32768- and a 32767-token prefill after warm-up, cuBLAS
picked different GEMM kernels for the two row counts and each prefill loaded the ones it
launched first (1 and 3 lazy loads; the 3 took ~11 ms of device time). With lazy loading the
first of three 32K prefills was +8.8 and +20.7 ms over the second (two runs), with
``CUDA_MODULE_LOADING=EAGER`` +2.8 ms (one run; ``benchmarks/first_prefill.py``). Eager
loading costs the process ~3 s more at CUDA's start, ~2 s at cuBLAS's first call and ~1 GiB
of device memory. A value set in the environment wins here too.
"""

from __future__ import annotations

import os

QUEUE_LENGTH_CACHE_ENV = "RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S"
QUEUE_LENGTH_CACHE_S = 600.0
CUDA_MODULE_LOADING_ENV = "CUDA_MODULE_LOADING"


def serve_env() -> dict[str, str]:
    """The variables and their values: this process's own where set, else ours."""
    return {QUEUE_LENGTH_CACHE_ENV: os.environ.get(QUEUE_LENGTH_CACHE_ENV,
                                                   f"{QUEUE_LENGTH_CACHE_S:g}")}


def gpu_env() -> dict[str, str]:
    """What a GPU replica's process adds: every kernel loaded with its library, before ready."""
    return {CUDA_MODULE_LOADING_ENV: os.environ.get(CUDA_MODULE_LOADING_ENV, "EAGER")}


def set_process_env() -> None:
    """Put ``serve_env()`` into this process's environment, before it starts a Ray instance:
    every process that instance starts (Serve's controller and proxy among them) inherits it."""
    os.environ.update(serve_env())
