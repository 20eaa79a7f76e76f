"""Dense causal attention over absolute positions, through torch's SDPA.

A whole causal square (a prefill's dense layers, a local prompt's first chunk) on CUDA runs on
the kernel that ``dense_backends`` measured cheapest for a prompt of its length: cuDNN for long
prompts (545-600 TFLOP/s causal on the H200; FA2 1.7x slower), FlashAttention-2 for short ones
(cuDNN's plan for a new length costs more than it saves there), FlashAttention-4 where it is
installed and cheaper.
A query range against a longer key range (decode rows, chunks) needs a mask or lower-right
causality: cuDNN runs those without tile skipping and rebuilds plans when the mask's shape
changes, so they keep torch's default choice. Grouped-query attention is native
(``enable_gqa``): K/V are never repeated to all query heads. On CPU SDPA runs its math kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from disagg.attention.dense_backends import causal_square


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: int,
    k_start: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of query rows against a key range.

    q ``[Tq, Hq, D]`` holds rows at absolute positions ``q_start ..``; k, v ``[Tk, Hkv, D]`` hold
    keys at ``k_start ..``. Key j is visible to query i iff j <= i. Returns ``[Tq, Hq, D]``.
    """
    num_q, num_k = q.shape[0], k.shape[0]
    square = q_start == k_start and num_q == num_k and num_q > 1
    if square and q.is_cuda:
        return causal_square(q, k, v, scale)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if square:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                              enable_gqa=True).squeeze(0).transpose(0, 1)
    mask = None
    if q_start < k_start + num_k - 1:
        q_pos = torch.arange(q_start, q_start + num_q, device=q.device)
        k_pos = torch.arange(k_start, k_start + num_k, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)

