"""Exact log-sum-exp merge of partial attention results over disjoint key ranges.

A partial result over key set ``K_s`` is ``(o_s, lse_s)`` with ``o_s = sum_j softmax_j v_j``
restricted to ``K_s`` and ``lse_s = log sum_{j in K_s} exp(score_j)``. Over the union,
``lse = log sum_s exp(lse_s)`` and ``o = sum_s exp(lse_s - lse) o_s``. A part that saw no key
has ``lse_s = -inf`` and weight 0; a row no part saw stays ``out = 0, lse = -inf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results: ``outs[s]`` ``[Tq, Hq, D]``, ``lses[s]`` ``[Hq, Tq]`` fp32.

    Returns ``(out [Tq, Hq, D]`` in ``outs[0]``'s dtype, ``lse [Hq, Tq]`` fp32), computed in fp32.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError("merge_attention needs as many outputs as lses, at least one")
    lse_all = torch.stack([x.float() for x in lses])  # [S, Hq, Tq]
    lse_max = lse_all.amax(dim=0)
    # A row every part missed has max -inf; shift by 0 there so the weights are exp(-inf) = 0,
    # not exp(nan).
    shift = torch.where(torch.isneginf(lse_max), torch.zeros_like(lse_max), lse_max)
    weights = torch.exp(lse_all - shift)  # [S, Hq, Tq]
    total = weights.sum(dim=0)
    lse = torch.where(total > 0, torch.log(total) + shift, torch.full_like(total, -float("inf")))
    norm = weights / torch.where(total > 0, total, torch.ones_like(total))
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for w, o in zip(norm, outs):
        out += w.transpose(0, 1).unsqueeze(-1) * o.float()
    return out.to(outs[0].dtype), lse
