"""Typed launcher of the Triangle Triton kernel: checks inputs, plans the grid, launches
(one launch, or the last rows' launch then the band's when the config has ``split``), merges.

Layouts: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]`` (last dim contiguous; token and head strides
free), out ``[Tq, Hq, D]`` in q's dtype, lse ``[Hq, Tq]`` fp32 (natural log).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from .configs import TileConfig, pick_config
from .kernel import _merge_splits, _triangle_fwd
from .params import TriangleParams
from .reference import check_inputs

LOG2E = 1.4426950408889634
MERGE_BLOCK_R = 32  # (row, head) pairs per merge program
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class LaunchPlan:
    """Grid geometry of one call (also used to count the tiles the kernel computes)."""

    tokens_per_tile: int
    band_rows: int  # local query rows [0, band_rows) are middle (windowed) rows
    num_band_tiles: int
    num_last_tiles: int
    last_keys: int  # keys [0, last_keys) of the given range can be seen by the last rows
    split_keys: int
    num_splits: int


def plan_launch(
    num_q: int, num_k: int, group: int, *, num_tokens: int, q_start: int, k_start: int,
    params: TriangleParams, cfg: TileConfig,
) -> LaunchPlan:
    tokens = cfg.block_m // group
    cfg = cfg.last_rows  # the split geometry follows the configuration the last rows run with
    band_rows = min(max(params.first_last_row(num_tokens) - q_start, 0), num_q)
    last_rows = num_q - band_rows
    last_keys = min(max(q_start + num_q - k_start, 0), num_k)
    split_keys, num_splits = cfg.min_split_keys, 0
    if last_rows > 0 and last_keys > 0:
        split_keys = max(cfg.min_split_keys, triton.cdiv(last_keys, cfg.max_splits))
        split_keys = triton.cdiv(split_keys, cfg.block_n) * cfg.block_n
        num_splits = triton.cdiv(last_keys, split_keys)
    return LaunchPlan(
        tokens_per_tile=tokens,
        band_rows=band_rows,
        num_band_tiles=triton.cdiv(band_rows, tokens),
        num_last_tiles=triton.cdiv(last_rows, tokens),
        last_keys=last_keys,
        split_keys=split_keys,
        num_splits=num_splits,
    )


def computed_key_columns(plan: LaunchPlan, *, q_start: int, k_start: int, num_k: int,
                         params: TriangleParams, cfg: TileConfig) -> int:
    """Key columns the kernel computes, summed over programs of one KV head (each program
    computes ``block_m`` rows against them). Mirrors the loop bounds of ``_triangle_fwd``."""
    tok, bn, bs = plan.tokens_per_tile, cfg.block_n, cfg.block_s
    split_bn = cfg.last_rows.block_n
    t0 = torch.arange(plan.num_band_tiles, dtype=torch.int64) * tok
    t_hi = torch.clamp(t0 + tok, max=plan.band_rows)
    qa0, qa1 = q_start + t0, q_start + t_hi - 1
    a = torch.clamp(qa0 - params.n_window + 1 - k_start, min=0) // bn * bn
    e = torch.maximum(torch.clamp(qa1 + 1 - k_start, max=num_k), a)
    sink_end = torch.clamp(torch.clamp(torch.full_like(a, params.n_sink - k_start), min=0), max=a)
    sink_end = torch.clamp(sink_end, max=num_k)
    band = ((e - a + bn - 1) // bn * bn).sum() + ((sink_end + bs - 1) // bs * bs).sum()
    lo = torch.arange(plan.num_splits, dtype=torch.int64) * plan.split_keys
    hi = torch.clamp(lo + plan.split_keys, max=plan.last_keys)
    split = ((hi - lo + split_bn - 1) // split_bn * split_bn).sum() * plan.num_last_tiles
    return int(band + split)


def triangle_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_tokens: int,
    q_start: int = 0,
    k_start: int = 0,
    params: TriangleParams = TriangleParams(),  # noqa: B008 (frozen, immutable)
    scale: float | None = None,
    config: TileConfig | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle attention with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    Same contract as ``triangle_attention``. ``config`` overrides the tile table (tuning);
    ``out`` ``[Tq, Hq, D]`` and ``lse`` ``[Hq, Tq]`` are optional contiguous destinations,
    every element of which the call writes.
    """
    check_inputs(q, k, v, num_tokens, q_start, k_start)
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last (head_dim) dimension")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    num_q, num_heads_q, head_dim = q.shape
    num_k, num_heads_kv, _ = k.shape
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    group = num_heads_q // num_heads_kv
    cfg = config or pick_config(q.device, head_dim, group, q.dtype)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(num_heads_q, num_q, dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError("out must be [Tq, Hq, D] in q's dtype with a contiguous last dim")
    if lse.shape != (num_heads_q, num_q) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError("lse must be a contiguous fp32 [Hq, Tq] tensor")
    if num_q == 0:
        return out, lse
    plan = plan_launch(num_q, num_k, group, num_tokens=num_tokens, q_start=q_start,
                       k_start=k_start, params=params, cfg=cfg)
    last_rows = num_q - plan.band_rows
    if last_rows > 0 and plan.num_splits == 0:  # the last rows see no key of this range
        out[plan.band_rows:] = 0
        lse[:, plan.band_rows:] = -float("inf")
    ws_out = torch.empty(plan.num_splits, last_rows, num_heads_q, head_dim,
                         dtype=torch.float32, device=q.device)
    ws_lse = torch.empty(plan.num_splits, num_heads_q, last_rows,
                         dtype=torch.float32, device=q.device)
    args = (q, k, v, out, lse, ws_out, ws_lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            num_q, num_k, num_heads_q, q_start, k_start, params.n_sink, params.n_window,
            plan.band_rows, plan.num_band_tiles)
    split_progs = plan.num_last_tiles * plan.num_splits * num_heads_kv
    band_progs = plan.num_band_tiles * num_heads_kv
    # Split programs: (num_last_tiles, num_splits); band programs come after them in the grid.
    if cfg.split is None:  # one launch: the long split programs start first
        _launch(args, (plan.num_last_tiles, plan.num_splits), plan, split_progs + band_progs,
                cfg, group, head_dim, scale, q)
    else:  # the last rows with their own tiles, then the band alone
        _launch(args, (plan.num_last_tiles, plan.num_splits), plan, split_progs, cfg.split,
                group, head_dim, scale, q)
        _launch(args, (0, 0), plan, band_progs, cfg, group, head_dim, scale, q)
    if last_rows > 0 and plan.num_splits > 0:
        pairs = last_rows * num_heads_q
        _merge_splits[(triton.cdiv(pairs, MERGE_BLOCK_R),)](
            ws_out, ws_lse, out, lse, out.stride(0), out.stride(1),
            num_q, num_heads_q, plan.band_rows, plan.num_splits,
            HEAD_DIM=head_dim, BLOCK_R=MERGE_BLOCK_R, num_warps=4,
        )
    return out, lse


def _launch(args: tuple, last: tuple[int, int], plan: LaunchPlan, num_programs: int,
            cfg: TileConfig, group: int, head_dim: int, scale: float, q: torch.Tensor) -> None:
    """One ``_triangle_fwd`` launch of the first ``num_programs`` programs of the grid."""
    if num_programs == 0:
        return
    extra = {"maxnreg": cfg.maxnreg} if cfg.maxnreg is not None and q.is_cuda else {}
    _triangle_fwd[(num_programs,)](
        *args, *last, plan.split_keys, plan.last_keys, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_S=cfg.block_s, LOOP=cfg.loop,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
    )
