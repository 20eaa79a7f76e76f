"""Warm-up of a prefill engine: compile every kernel a served prefill runs, before ready.

Life of a warm-up (``warm_up_prefill``, called once by the server before it reports ready):
0. On CUDA, ``dense_backends.tune_causal`` times cuDNN, FlashAttention-2 and FlashAttention-4
   (when it imports) per length bucket of the dense causal square and keeps the cheapest for
   a prompt of the engine's dense layers (``num_dense_layers``: a kernel's first call at a new
   length is paid once per prompt, its steady time once per dense layer); FA4 compiles there.
1. A short dense prefill: cuBLAS handles, the short bucket's attention kernel, the fused
   norm / RoPE / SiLU kernels (their row counts are not specialized, so one length compiles
   them for all).
2. With TriangleMix on CUDA, one prefill per Triton *specialization class* of the Triangle
   kernel's launches. Triton compiles a variant per integer argument that equals 1 or is
   divisible by 16, so a prompt whose length, band-tile count or key-split count falls in a
   class not seen yet would compile (seconds) inside a user's request. ``triangle_warmup_lengths``
   picks the shortest prompt of every class that served prompts can reach; each of those
   prefills runs the last rows' launch, the band launch and the split merge.
On CPU the engine runs PyTorch references (no JIT): one tiny prefill checks the path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from disagg.attention.dense_backends import Timing, tune_causal
from disagg.attention.metadata import AttentionKind
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest

DENSE_WARMUP_TOKENS = 16


@dataclass(frozen=True)
class WarmupReport:
    """What a warm-up ran: the prompt lengths of its prefills and the seconds it took."""

    prompt_lengths: tuple[int, ...]
    seconds: float
    dense_kernels: tuple[Timing, ...] = ()


def warm_up_prefill(engine: PrefillEngine) -> WarmupReport:
    """Run the prefills that compile every kernel ``engine`` will run (see the module doc)."""
    t0 = time.perf_counter()
    config = engine.model.config
    context = config.max_context_tokens
    dense_kernels = ()
    if engine.device.type == "cuda":
        dense_kernels = tuple(tune_causal(
            engine.device, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, dtype=engine.layout.dtype, max_tokens=context - 1,
            calls_per_prompt=lambda n: num_dense_layers(engine, n)))
    lengths = [min(DENSE_WARMUP_TOKENS, context - 1)]
    if engine.device.type == "cuda" and engine.trianglemix is not None:
        lengths += triangle_warmup_lengths(engine, max_tokens=context - 1)
    vocab = config.vocab_size
    for n in lengths:
        engine.prefill(EngineRequest.random_prefill(f"warmup-{n}", n, vocab_size=vocab,
                                                    context=context, seed=n))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return WarmupReport(tuple(lengths), time.perf_counter() - t0, dense_kernels)


def num_dense_layers(engine: PrefillEngine, num_prompt_tokens: int) -> int:
    """How many layers run the dense causal square in a prefill of ``num_prompt_tokens``."""
    layers = range(engine.model.config.num_layers)
    if engine.trianglemix is None:
        return len(layers)
    return sum(engine.trianglemix.kind(i, num_prompt_tokens) == AttentionKind.DENSE
               for i in layers)


def triangle_warmup_lengths(engine: PrefillEngine, *, max_tokens: int) -> list[int]:
    """The shortest prompt length of every Triangle-launch specialization class reachable
    with prompts of at most ``max_tokens`` tokens (CUDA engines with TriangleMix only)."""
    from disagg_kernels.triangle_mix.configs import pick_config

    config = engine.model.config
    group = config.num_heads // config.num_kv_heads
    tiles = pick_config(engine.device, config.head_dim, group, engine.layout.dtype)
    params = engine.trianglemix.params
    first = engine.trianglemix.min_sparse_tokens + 1
    # Past max_splits * min_split_keys keys the split count stays at its largest values and
    # only the prompt length and band-tile count move, both periodic (16, 16 tiles): a scan to
    # one period beyond sees every class (tests/prefill/test_warmup.py checks it up to 128K).
    last_rows = tiles.last_rows
    tokens_per_tile = tiles.block_m // group
    bound = last_rows.max_splits * last_rows.min_split_keys + 32 * tokens_per_tile + first
    seen: dict[tuple[str, ...], int] = {}
    for n in range(first, min(max_tokens, bound) + 1):
        seen.setdefault(triangle_specialization(n, group, tiles, params), n)
    return sorted(seen.values())


def triangle_specialization(num_tokens: int, group: int, tiles, params) -> tuple[str, ...]:
    """The Triton specialization of the integer arguments that vary with the prompt length in
    the Triangle launches of a whole-prompt prefill (``launcher.plan_launch``'s grid)."""
    from disagg_kernels.triangle_mix.launcher import plan_launch

    plan = plan_launch(num_tokens, num_tokens, group, num_tokens=num_tokens, q_start=0,
                       k_start=0, params=params, cfg=tiles)
    values = (num_tokens, plan.band_rows, plan.num_band_tiles, plan.num_last_tiles,
              plan.num_splits, plan.split_keys, plan.last_keys)
    return tuple(_int_class(v) for v in values)


def _int_class(value: int) -> str:
    """Triton's key for an int argument: the constant 1, divisible by 16, or neither."""
    if value == 1:
        return "1"
    return "D" if value % 16 == 0 else "i"
