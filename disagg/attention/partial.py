"""Dense attention that also returns its log-sum-exp, for results merged across key ranges.

Sequence-parallel prefill splits one causal attention into pieces over disjoint key ranges
(a causal diagonal block, unmasked rectangles of earlier keys) and merges them exactly by
log-sum-exp (``disagg_kernels.triangle_mix.merge_attention``). The public SDPA returns no
log-sum-exp, so this calls the private ATen ops that do, each with native GQA (K/V never
repeated to all query heads):

- CUDA, 16-bit: ``_scaled_dot_product_cudnn_attention`` (cuDNN, the fastest dense kernel on
  the H200: DESIGN.md section 5), with ``_scaled_dot_product_flash_attention`` (FA2) as the
  fallback where cuDNN refuses a shape;
- CPU (and fp32 on CUDA): ``_scaled_dot_product_flash_attention_for_cpu`` on CPU, the
  chunked fp32 PyTorch reference elsewhere.

Only two shapes are asked for, so no mask tensor is ever built: a causal square (queries and
keys at the same positions) and a rectangle whose keys all precede its queries.
"""

from __future__ import annotations

import torch
from disagg_kernels.triangle_mix import TriangleParams, triangle_attention_reference

_LIBRARY_DTYPES = (torch.float16, torch.bfloat16)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q ``[Tq, Hq, D]`` over k, v ``[Tk, Hkv, D]``.

    ``causal``: queries and keys sit at the same positions (``Tq == Tk``), key j visible to
    query i iff j <= i. Otherwise every key is visible (they all precede the queries).
    Returns ``(out [Tq, Hq, D]`` in q's dtype, ``lse [Hq, Tq]`` fp32, natural log).
    """
    if causal and q.shape[0] != k.shape[0]:
        raise ValueError(f"a causal block needs as many queries as keys ({q.shape[0]} vs "
                         f"{k.shape[0]})")
    if k.shape[0] == 0:
        return (torch.zeros_like(q),
                torch.full((q.shape[1], q.shape[0]), -float("inf"), device=q.device))
    if q.is_cuda and q.dtype in _LIBRARY_DTYPES:
        return _cuda(q, k, v, causal, scale)
    if q.device.type == "cpu":
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kh, vh, 0.0, causal, scale=scale)
        return out[0].transpose(0, 1), lse[0].float()
    return _reference(q, k, v, causal, scale)


def _cuda(q, k, v, causal: bool, scale: float):
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    try:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qh, kh, vh, None, True, 0.0, causal, False, scale=scale)[:2]
    except RuntimeError:  # a shape or head dim cuDNN does not take: FA2, same contract
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse.reshape(q.shape[1], q.shape[0]).float()


def _reference(q, k, v, causal: bool, scale: float):
    """The chunked fp32 reference with a mask that keeps every causal pair."""
    num_q, num_k = q.shape[0], k.shape[0]
    q_start = 0 if causal else num_k
    num_tokens = q_start + num_q
    keep_all = TriangleParams(n_sink=0, n_window=num_tokens, n_last=0)
    return triangle_attention_reference(q, k, v, num_tokens=num_tokens, q_start=q_start,
                                        k_start=0, params=keep_all, scale=scale)
