"""TriangleMix prefill attention: Triton kernel, PyTorch reference, log-sum-exp merge.

Key ``j`` is kept for query ``i`` of a prompt of ``N`` tokens iff
``j <= i and (i >= N - n_last or j < n_sink or i - j < n_window)`` (see ``params``).
"""

from __future__ import annotations

import torch

from .merge import merge_attention
from .params import TriangleParams, num_kept_pairs, triangle_keep
from .reference import (
    dense_causal_reference,
    masked_attention_reference,
    triangle_attention_reference,
    triangle_mask,
)

__all__ = [
    "TriangleParams",
    "dense_causal_reference",
    "masked_attention_reference",
    "merge_attention",
    "num_kept_pairs",
    "triangle_attention",
    "triangle_attention_reference",
    "triangle_attention_triton",
    "triangle_keep",
    "triangle_mask",
]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1); same contract as
    ``triangle_attention``. Imported lazily: the CPU engine must import without triton."""
    from .launcher import triangle_attention_triton as launch

    return launch(q, k, v, num_tokens=num_tokens, q_start=q_start, k_start=k_start,
                  params=params, scale=scale)


def triangle_attention(
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
    """Triangle attention of a query range against a key range of one prompt.

    q ``[Tq, Hq, D]`` holds query rows at absolute positions ``q_start .. q_start+Tq-1`` of a
    prompt of ``num_tokens`` tokens; k, v ``[Tk, Hkv, D]`` hold keys at ``k_start ..
    k_start+Tk-1``. ``Hq % Hkv == 0`` (GQA, native). Returns ``(out [Tq, Hq, D]`` in q's
    dtype, ``lse [Hq, Tq]`` fp32 natural-log log-sum-exp of the scaled scores); a row with no
    kept key in the given range has ``lse = -inf`` and ``out = 0``. CUDA tensors run the
    Triton kernel, others the PyTorch reference.
    """
    impl = triangle_attention_triton if q.is_cuda else triangle_attention_reference
    return impl(q, k, v, num_tokens=num_tokens, q_start=q_start, k_start=k_start,
                params=params, scale=scale)
