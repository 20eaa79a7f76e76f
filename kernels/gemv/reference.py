"""The skinny matrix product's oracle: ``torch.nn.functional.linear`` in fp32, rounded once."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gemv_reference(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ weight [N, K]^T (+ bias)`` accumulated in fp32, in x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)
