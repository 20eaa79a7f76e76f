"""Which kernel runs a dense causal square on CUDA: cuDNN or FlashAttention-2 (both through
torch's SDPA) or FlashAttention-4 (``flash-attn-4``, CuTe DSL; an optional package), chosen per
shape by measurement.

Life of a choice:
1. At import every shape runs on cuDNN, the fastest steady kernel torch ships.
2. ``tune_causal`` (the prefill and decode warm-ups call it on CUDA) times every kernel this
   process can run once per length bucket (powers of two, from ``MIN_TUNED_TOKENS``) on random
   inputs of the model's head layout and records the cheapest for a prompt; FA4's JIT
   compilation happens there, before the replica is ready. A prompt's cost counts its first
   call at a length apart: cuDNN builds a plan for every new shape (45-80 ms on an H200, once
   per prompt, since a served prompt's length is new; at 8K tokens its steady call is 1 ms),
   the FlashAttention kernels do not, so the cost of a kernel for a prompt of ``calls`` dense
   layers is ``calls x steady + (first call - steady)``. Short prompts therefore run FA2 or
   FA4, long ones the kernel of least steady time.
3. ``causal_square`` runs a tuned bucket's winner; an untuned bucket runs cuDNN.
cuDNN's plans live in a per-thread cache (torch keeps them ``thread_local``, keyed by shape
and strides): a plan built on one thread is built again on another, so the prefill server
warms up on the thread that serves its prefills.
``DISAGG_DENSE_ATTENTION=cudnn|flash|fa4`` forces one kernel for every shape (benchmarks,
tests); ``auto`` (the default) is the measured choice. A forced ``fa4`` without the package is
an error. Tensors are ``[T, H, D]`` (token-major, the model's layout): FA4 takes them as they
are, SDPA through a transposed view.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from disagg.errors import DisaggError

KERNELS = ("cudnn", "flash", "fa4")  # flash: FlashAttention-2 as torch ships it
ENV_VAR = "DISAGG_DENSE_ATTENTION"
MIN_TUNED_TOKENS = 256  # the smallest bucket: shorter prompts share its choice
COMPILE_TOKENS = 1024  # the length every kernel first runs at in a tuning (its compilation)


class DenseBackendError(DisaggError):
    """A dense-attention kernel was asked for that this process cannot run."""


@dataclass(frozen=True)
class ShapeKey:
    """What a choice is keyed by: the length bucket and the head layout."""

    bucket: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass(frozen=True)
class Timing:
    """One tuning measurement at ``tokens`` tokens: each kernel's steady seconds per call
    (``seconds``) and the wall seconds of its first call at that length (``first_seconds``),
    for a prompt of ``calls`` dense layers; ``winner`` has the lowest ``cost``."""

    key: ShapeKey
    tokens: int
    seconds: dict[str, float]
    first_seconds: dict[str, float]
    calls: int
    winner: str

    def cost(self, kernel: str) -> float:
        """Seconds of dense attention in one prompt of this length on ``kernel``."""
        steady = self.seconds[kernel]
        return self.calls * steady + max(self.first_seconds[kernel] - steady, 0.0)

    def as_row(self) -> dict:
        """The measurement as a results-file row (milliseconds)."""
        return {"bucket": self.key.bucket, "tokens": self.tokens, "calls": self.calls,
                "winner": self.winner,
                "ms": {k: round(s * 1e3, 3) for k, s in self.seconds.items()},
                "first_ms": {k: round(s * 1e3, 3) for k, s in self.first_seconds.items()}}


_CHOICES: dict[ShapeKey, str] = {}


def bucket(num_tokens: int) -> int:
    """The length bucket of a choice: the power of two at or above ``num_tokens``, at least
    ``MIN_TUNED_TOKENS``."""
    return max(1 << max(num_tokens - 1, 1).bit_length(), MIN_TUNED_TOKENS)


def _key(q: torch.Tensor, k: torch.Tensor) -> ShapeKey:
    return ShapeKey(bucket(q.shape[0]), q.shape[1], k.shape[1], q.shape[2], q.dtype)


@functools.cache
def _fa4():
    """FA4's forward, or None when the package (or its CUDA libraries) does not import."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return None
    return flash_attn_func


def fa4_available() -> bool:
    return _fa4() is not None


def forced_kernel() -> str | None:
    """The kernel ``DISAGG_DENSE_ATTENTION`` forces, or None for the measured choice."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value == "auto":
        return None
    if value not in KERNELS:
        raise DenseBackendError(f"{ENV_VAR}={value!r}: expected auto, {', '.join(KERNELS)}")
    if value == "fa4" and not fa4_available():
        raise DenseBackendError(f"{ENV_VAR}=fa4 but flash_attn.cute does not import")
    return value


def kernel_for(q: torch.Tensor, k: torch.Tensor) -> str:
    """The kernel a causal square of these shapes runs on now."""
    return forced_kernel() or _CHOICES.get(_key(q, k), "cudnn")


def causal_square(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                  kernel: str | None = None) -> torch.Tensor:
    """Causal self-attention of ``[T, H, D]`` CUDA tensors (queries and keys at the same
    positions, grouped-query K/V ``[T, Hkv, D]``); returns ``[T, Hq, D]``."""
    kernel = kernel or kernel_for(q, k)
    if kernel == "fa4":
        out = _fa4()(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), softmax_scale=scale,
                     causal=True)
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    sdpa = sdpa_flash if kernel == "flash" else sdpa_cudnn
    return sdpa(qh, kh, vh, scale).squeeze(0).transpose(0, 1)


def sdpa_cudnn(qh, kh, vh, scale: float | None) -> torch.Tensor:
    """Causal SDPA of ``[B, H, T, D]`` on cuDNN, or on torch's default choice where cuDNN
    refuses the shape. Only the enabled flags are switched (and restored on exit): the
    process-wide priority order is never set. Setting it, even restored afterwards, slowed
    every later SDPA user of the process: transformers' 128K prefill took 16.97 s after our
    warm-up against 11.58 s before it (torch 2.11, H200; its default dispatch ran cuDNN).
    The flags are process-wide too: this assumes one forward at a time per process, as in the
    servers (``disagg.inprocess`` runs prefill and decode on two threads and can race them)."""
    return _sdpa_on(SDPBackend.CUDNN_ATTENTION, qh, kh, vh, scale)


def sdpa_flash(qh, kh, vh, scale: float | None) -> torch.Tensor:
    """Causal SDPA of ``[B, H, T, D]`` on torch's FlashAttention-2 (as ``sdpa_cudnn``)."""
    return _sdpa_on(SDPBackend.FLASH_ATTENTION, qh, kh, vh, scale)


def _sdpa_on(backend: SDPBackend, qh, kh, vh, scale: float | None) -> torch.Tensor:
    try:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                  enable_gqa=True)
    except RuntimeError:  # no such kernel for this shape or dtype
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                              enable_gqa=True)


def time_call(fn, *args, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn(*args)`` after one warm call (CUDA events)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def wall_seconds(fn, *args) -> float:
    """Wall seconds of one call of ``fn(*args)``, the device synchronized before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _random_qkv(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(tokens)
    q = torch.randn(tokens, num_heads, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(tokens, num_kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    return q, k, torch.randn_like(k)


def tune_causal(device: torch.device, *, num_heads: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, max_tokens: int,
                calls_per_prompt: int | Callable[[int], int] = 1,
                repeats: int = 3, kernels: Iterable[str] = KERNELS) -> list[Timing]:
    """Time every kernel at each bucket from ``MIN_TUNED_TOKENS`` to ``max_tokens`` not tuned
    yet (choices are process-wide: a second engine of the same heads measures nothing again)
    and record the one of least ``Timing.cost`` for a prompt of ``calls_per_prompt`` dense
    layers (a number, or a function of the prompt's length: which layers run dense can depend
    on it); returns the new measurements (none off CUDA, or with fewer than two ``kernels``
    this process can run). Every kernel runs once first at a short length (its compilation),
    and once at each bucket's length before the calls measured one token shorter: what a
    length class compiles once per process is not taken for what every new prompt pays. The
    buffers of the measurements go back to the device when it ends."""
    kernels = [k for k in kernels if k != "fa4" or fa4_available()]
    if len(kernels) < 2 or device.type != "cuda":
        return []
    lengths, n = [], MIN_TUNED_TOKENS
    while not lengths or lengths[-1] < max_tokens:
        lengths.append(min(n, max_tokens))
        n *= 2
    keys = {n: ShapeKey(bucket(n), num_heads, num_kv_heads, head_dim, dtype) for n in lengths}
    lengths = [n for n in lengths if keys[n] not in _CHOICES]
    if lengths:
        compile_args = _random_qkv(COMPILE_TOKENS, num_heads, num_kv_heads, head_dim, device,
                                   dtype)
        for name in kernels:
            causal_square(*compile_args, None, name)
        del compile_args
    timings = []
    for tokens in lengths:
        key = keys[tokens]
        q, k, v = _random_qkv(max(tokens, 3), num_heads, num_kv_heads, head_dim, device, dtype)
        for name in kernels:  # once per process: cuDNN's first 20K call took 0.6 s, fresh H200
            causal_square(q, k, v, None, name)
        q, k, v = q[:-1], k[:-1], v[:-1]  # a length no call had: what every new prompt pays
        first = {name: wall_seconds(causal_square, q, k, v, None, name)
                 for name in kernels}
        seconds = {name: time_call(causal_square, q, k, v, None, name, repeats=repeats)
                   for name in kernels}
        calls = calls_per_prompt(tokens) if callable(calls_per_prompt) else calls_per_prompt
        timing = Timing(key, q.shape[0], seconds, first, calls, winner="")
        winner = min(kernels, key=timing.cost)
        _CHOICES[key] = winner
        timings.append(replace(timing, winner=winner))
        del q, k, v
    torch.cuda.empty_cache()
    return timings


def reset_choices() -> None:
    """Forget every tuned choice (tests)."""
    _CHOICES.clear()


def choices() -> dict[ShapeKey, str]:
    return dict(_CHOICES)

