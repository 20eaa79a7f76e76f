"""Plain-PyTorch Triangle attention: the CPU path of the engine and the kernels' oracle.

``triangle_attention_reference`` works in fp32 on any device and never builds an ``N x N``
matrix: query rows go in chunks, each chunk visits only the key intervals its mask can keep
(the sinks and its window band for middle rows, everything up to the diagonal for dense last
rows) in key chunks merged by log-sum-exp. Memory per step is bounded by the chunk sizes.

``masked_attention_reference`` is the explicit-mask dense computation (tests, small ``N``).
GQA is native in both: query heads are grouped per KV head, K/V are never repeated.
"""

from __future__ import annotations

import math

import torch

from .merge import merge_attention
from .params import TriangleParams, triangle_keep

QUERY_CHUNK = 256
KEY_CHUNK = 2048


def check_inputs(q, k, v, num_tokens: int, q_start: int, k_start: int) -> None:
    """Shape contract shared by every implementation (see ``triangle_attention``)."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [T, H, D]")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[2] != k.shape[2]:
        raise ValueError("q and k head dims differ")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError("q, k, v must share a dtype")
    if num_tokens < 1 or q_start < 0 or k_start < 0:
        raise ValueError("num_tokens must be >= 1 and starts >= 0")
    if q_start + q.shape[0] > num_tokens or k_start + k.shape[0] > num_tokens:
        raise ValueError("query or key range runs past num_tokens")


def _attend(q, k, v, keep, scale):
    """Partial attention of grouped queries over one key block, fp32.

    q ``[Hkv, G, Tq, D]``, k/v ``[Hkv, Tk, D]``, keep ``[Tq, Tk]`` bool.
    Returns out ``[Hkv, G, Tq, D]`` (0 where nothing kept) and lse ``[Hkv, G, Tq]``.
    """
    s = torch.einsum("hgqd,hkd->hgqk", q, k) * scale
    s = s.masked_fill(~keep, -float("inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(s - lse) on a row with lse = -inf would be nan; such rows kept nothing.
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return torch.einsum("hgqk,hkd->hgqd", p, v), lse


def _key_intervals(r0: int, r1: int, num_tokens: int, k_start: int, k_end: int, params):
    """Disjoint absolute key intervals [a, b) that rows r0..r1-1 may keep, within the keys."""
    if r1 - 1 >= params.first_last_row(num_tokens):
        spans = [(0, r1)]
    else:
        spans = [(0, min(params.n_sink, r1)), (max(0, r0 - params.n_window + 1), r1)]
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        a, b = max(a, k_start), min(b, k_end)
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def triangle_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_tokens: int,
    q_start: int = 0,
    k_start: int = 0,
    params: TriangleParams = TriangleParams(),  # noqa: B008 (frozen, immutable)
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triangle attention in fp32 PyTorch, chunked (see ``triangle_attention`` for the contract)."""
    check_inputs(q, k, v, num_tokens, q_start, k_start)
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(tq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((hq, tq), -float("inf"), dtype=torch.float32, device=q.device)
    kf = k.float().transpose(0, 1)  # [Hkv, Tk, D]
    vf = v.float().transpose(0, 1)
    k_end = k_start + tk
    for c0 in range(0, tq, QUERY_CHUNK):
        c1 = min(c0 + QUERY_CHUNK, tq)
        r0, r1 = q_start + c0, q_start + c1
        qc = q[c0:c1].float().view(c1 - c0, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, C, D]
        rows = torch.arange(r0, r1, device=q.device)[:, None]
        acc_o = acc_l = None  # running merge: memory stays one key chunk deep
        for a, b in _key_intervals(r0, r1, num_tokens, k_start, k_end, params):
            for s0 in range(a, b, KEY_CHUNK):
                s1 = min(s0 + KEY_CHUNK, b)
                cols = torch.arange(s0, s1, device=q.device)[None, :]
                keep = triangle_keep(rows, cols, num_tokens, params)
                o, l = _attend(
                    qc, kf[:, s0 - k_start : s1 - k_start], vf[:, s0 - k_start : s1 - k_start],
                    keep, scale,
                )
                o = o.permute(2, 0, 1, 3).reshape(c1 - c0, hq, d)
                l = l.reshape(hq, c1 - c0)
                if acc_o is None:
                    acc_o, acc_l = o, l
                else:
                    acc_o, acc_l = merge_attention([acc_o, o], [acc_l, l])
        if acc_o is not None:
            out[c0:c1] = acc_o.to(q.dtype)
            lse[:, c0:c1] = acc_l
    return out, lse


def triangle_mask(
    num_tokens: int, q_start: int, num_q: int, k_start: int, num_k: int, params: TriangleParams,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Explicit ``[num_q, num_k]`` bool mask of the Triangle pattern (small sizes only)."""
    i = torch.arange(q_start, q_start + num_q, device=device)[:, None]
    j = torch.arange(k_start, k_start + num_k, device=device)[None, :]
    return triangle_keep(i, j, num_tokens, params)


def masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 attention under an explicit ``[Tq, Tk]`` mask; builds the whole score matrix."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().view(tq, hkv, hq // hkv, d).permute(1, 2, 0, 3)
    o, l = _attend(qg, k.float().transpose(0, 1), v.float().transpose(0, 1), keep, scale)
    return o.permute(2, 0, 1, 3).reshape(tq, hq, d).to(q.dtype), l.reshape(hq, tq)


def dense_causal_reference(q, k, v, scale: float | None = None):
    """Dense causal attention of a whole prompt (``q``, ``k`` both cover positions 0..N-1)."""
    n = q.shape[0]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return masked_attention_reference(q, k, v, keep, scale)
