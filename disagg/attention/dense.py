"""Dense causal attention over absolute positions, through torch's SDPA.

SDPA picks the fastest kernel present (cuDNN on the H200, measured fastest there; the math
kernel on CPU) and takes grouped-query attention natively (``enable_gqa``), so K/V are never
repeated to all query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    mask, is_causal = None, False
    if q_start == k_start and num_q == num_k:
        is_causal = num_q > 1
    elif q_start < k_start + num_k - 1:
        q_pos = torch.arange(q_start, q_start + num_q, device=q.device)
        k_pos = torch.arange(k_start, k_start + num_k, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )
    return out.squeeze(0).transpose(0, 1)
