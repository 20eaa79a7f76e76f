"""Plain-PyTorch block-sparse attention: the CPU path of the engine and the kernel's oracle.

Block lists: ``block_idx [Hkv, Qb, W]`` int32 (key blocks of query block ``qb`` for KV head
``h``, the first ``block_count[h, qb]`` entries valid; any order here, ascending and causal for
the Triton kernel) and ``block_count [Hkv, Qb]``.
Query row ``i`` of block ``qb`` keeps key ``j`` iff ``j <= i`` and ``j // block_size`` is listed
for ``(h, qb)``. ``block_sparse_attention_reference`` gathers only the listed keys, one query
block at a time (memory ``O(block_size x kept keys)``), in fp32; ``block_mask`` expands the lists
to a dense ``[Hkv, N, N]`` mask for tests on small ``N``.
"""

from __future__ import annotations

import math

import torch


def check_block_inputs(q, k, v, block_idx, block_count, block_size: int) -> None:
    """Shape contract shared by the reference and the Triton launcher."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [N, H, D]")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError("q, k, v must share a dtype")
    num_blocks = -(-q.shape[0] // block_size)
    if block_idx.dim() != 3 or block_idx.shape[:2] != (k.shape[1], num_blocks):
        raise ValueError(f"block_idx must be [Hkv={k.shape[1]}, Qb={num_blocks}, W], "
                         f"got {tuple(block_idx.shape)}")
    if block_count.shape != (k.shape[1], num_blocks):
        raise ValueError(f"block_count must be [Hkv, Qb], got {tuple(block_count.shape)}")
    if block_idx.dtype != torch.int32 or block_count.dtype != torch.int32:
        raise ValueError("block_idx and block_count must be int32")


def block_sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
    block_count: torch.Tensor, *, block_size: int, scale: float | None = None,
) -> torch.Tensor:
    """Causal attention restricted to the listed blocks: q ``[N, Hq, D]``, k/v ``[N, Hkv, D]``
    -> out ``[N, Hq, D]`` in q's dtype (fp32 arithmetic). A row that keeps no key is 0."""
    check_block_inputs(q, k, v, block_idx, block_count, block_size)
    n, num_heads_q, head_dim = q.shape
    num_heads_kv = k.shape[1]
    group = num_heads_q // num_heads_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(n, num_heads_q, head_dim, dtype=torch.float32, device=q.device)
    idx, counts = block_idx.cpu(), block_count.cpu()
    offsets = torch.arange(block_size, device=q.device)
    for h in range(num_heads_kv):
        heads = slice(h * group, (h + 1) * group)
        for qb in range(counts.shape[1]):
            blocks = idx[h, qb, : int(counts[h, qb])].to(q.device, torch.long)
            if blocks.numel() == 0:
                continue
            rows = torch.arange(qb * block_size, min((qb + 1) * block_size, n), device=q.device)
            keys = (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)
            keys = keys[keys < n]
            qs = q[rows, heads].float().transpose(0, 1)  # [G, R, D]
            ks, vs = k[keys, h].float(), v[keys, h].float()  # [K, D]
            s = torch.einsum("grd,kd->grk", qs, ks) * scale
            keep = keys[None, :] <= rows[:, None]
            s = s.masked_fill(~keep, -float("inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: 0
            out[rows, heads] = torch.einsum("grk,kd->grd", p, vs).transpose(0, 1)
    return out.to(q.dtype)


def block_mask(block_idx: torch.Tensor, block_count: torch.Tensor, num_tokens: int,
               block_size: int) -> torch.Tensor:
    """``[Hkv, N, N]`` bool: key j kept for query i (listed block and causal)."""
    num_heads_kv, num_q_blocks, width = block_idx.shape
    listed = torch.zeros(num_heads_kv, num_q_blocks, num_q_blocks, dtype=torch.bool)
    valid = torch.arange(width)[None, None, :] < block_count[..., None].cpu()
    h, qb, w = valid.nonzero(as_tuple=True)
    listed[h, qb, block_idx.cpu()[h, qb, w].long()] = True
    pos = torch.arange(num_tokens)
    mask = listed[:, pos[:, None] // block_size, pos[None, :] // block_size]
    return mask & (pos[None, :] <= pos[:, None])
