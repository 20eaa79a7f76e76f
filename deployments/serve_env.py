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

GPU replicas also get ``gpu_env()``, the operator's values of:
- ``CUDA_MODULE_LOADING``, passed on (a replica started after the Ray instance would not
  inherit it otherwise); unset, CUDA's lazy default stays, each kernel loaded at its first
  launch. Eager loading was measured and not kept: on one H100 it left the served first 32K
  prefill's extra over the second as it was (+28.9 and +24.7 ms eager, +28.8 lazy, one app
  start each) and cost each start ~7-15 s and the two replicas 2.1 GiB more.
- ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE``: ``1`` makes torch's cuDNN attention on the BSHD layout
  (our ``[T, H, D]`` views are) take cuDNN's ragged path, which builds no plan per sequence
  length. Unset, every new prompt length pays a plan for its shape: a repeated 32K length ran
  40-46 ms faster than a new one on one H100 (FlashAttention-2 showed no such gap), and a
  served prompt's length is as a rule new (RESULTS.md, "The first long prefill after ready").
  Passed on, not set: its outputs hold (``tests/prefill/test_dense_backends_gpu.py``), but
  served on one H100 it did not make 32K prefills of new lengths faster (median 1033 against
  1039 ms, 8 requests each, ``benchmarks/served_decode.py --cudnn-avoid-recompile 1,0,1,0``).
- ``DISAGG_PROFILE_PREFILLS``: a directory; a prefill replica then profiles its first two
  served prefills there (``disagg/prefill/profiling.py``, a diagnostic).
"""

from __future__ import annotations

import os

from disagg.prefill.profiling import PROFILE_PREFILLS_ENV

QUEUE_LENGTH_CACHE_ENV = "RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S"
QUEUE_LENGTH_CACHE_S = 600.0
CUDA_MODULE_LOADING_ENV = "CUDA_MODULE_LOADING"
CUDNN_AVOID_RECOMPILE_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def serve_env() -> dict[str, str]:
    """The variables and their values: this process's own where set, else ours."""
    return {QUEUE_LENGTH_CACHE_ENV: os.environ.get(QUEUE_LENGTH_CACHE_ENV,
                                                   f"{QUEUE_LENGTH_CACHE_S:g}")}


def gpu_env() -> dict[str, str]:
    """What a GPU replica's process adds: the operator's ``CUDA_MODULE_LOADING``,
    ``TORCH_CUDNN_SDPA_AVOID_RECOMPILE`` and ``DISAGG_PROFILE_PREFILLS``, those set."""
    names = (CUDA_MODULE_LOADING_ENV, CUDNN_AVOID_RECOMPILE_ENV, PROFILE_PREFILLS_ENV)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def set_process_env() -> None:
    """Put ``serve_env()`` into this process's environment, before it starts a Ray instance:
    every process that instance starts (Serve's controller and proxy among them) inherits it."""
    os.environ.update(serve_env())
