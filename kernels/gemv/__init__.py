"""A skinny matrix product for decode steps (``x [M <= 16, K] @ w [N, K]^T``): Triton kernel,
typed launcher, PyTorch reference. The launcher is imported lazily: CPU installs need no
triton."""

from __future__ import annotations

from .reference import gemv_reference

__all__ = ["gemv_reference"]
