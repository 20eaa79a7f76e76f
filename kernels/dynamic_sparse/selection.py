"""Block selection of dynamic sparse attention: an estimate of every causal block's attention
mass -- XAttention's antidiagonal sums or MInference's vertical-slash pattern -- then a
threshold (or a fixed density) per query block. Plain PyTorch (a few matrix products and one
sort per layer); runs on any device.

Antidiagonal (``antidiagonal_block_scores``): with stride ``s``, super-token ``r`` of the
queries is the concatenation of ``q[r*s + s-1], q[r*s + s-2], .., q[r*s]`` and super-token
``c`` of the keys that of ``k[c*s], .., k[c*s + s-1]``, so ``Q' K'^T [r, c]`` sums the scores
of one antidiagonal of the ``s x s`` sub-block (r, c): every query row and every key column
of it appear once. A causal softmax over super-tokens (scale ``1/(sqrt(D) s)``: the mean score
of the antidiagonal) summed into ``block_size`` blocks estimates each block's attention mass
at ``N^2 D / (2 s)`` cost (row chunks skip the upper triangle).
Vertical-slash (``vertical_slash_block_scores``): the last queries' attention, as column and
diagonal masses spread over the blocks they cross, at ``64 N D`` cost.
Either way scores are summed over the query heads of a KV head: a block list is shared by the
group, so the kernel stays GQA-native (one list per KV head).
"""

from __future__ import annotations

import math

import torch

from .params import DynamicSparseParams

_CHUNK_SUPER = 1024  # query super-tokens per product of the estimate (128 MiB of fp32 at 128K)


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                              stride: int, scale: float | None = None) -> torch.Tensor:
    """q ``[N, Hq, D]``, k ``[N, Hkv, D]`` -> estimated attention mass ``[Hkv, Qb, Qb]`` fp32 of
    every causal block (0 above the diagonal); each row sums to 1."""
    n, num_heads_q, head_dim = q.shape
    num_heads_kv = k.shape[1]
    group = num_heads_q // num_heads_kv
    num_blocks = -(-n // block_size)
    padded = num_blocks * block_size
    num_super = padded // stride
    per_block = block_size // stride
    scale = (1.0 / math.sqrt(head_dim) if scale is None else scale) / stride
    q = q * scale  # folded into the queries: the products come out scaled
    # Fold the stride into the feature axis (see the module docstring).
    qp = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, padded - n))
    kp = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, padded - n))
    q_s = qp.view(num_super, stride, num_heads_q, head_dim).flip(1)
    q_s = q_s.permute(2, 0, 1, 3).reshape(num_heads_q, num_super, stride * head_dim)
    k_s = kp.view(num_super, stride, num_heads_kv, head_dim)
    k_s = k_s.permute(2, 0, 1, 3).reshape(num_heads_kv, num_super, stride * head_dim)
    # Query super-tokens in chunks of whole blocks: a chunk's rows see only the keys up to its
    # end, so the upper triangle is never computed (about half the products at 128K).
    chunk = max(per_block, _CHUNK_SUPER // per_block * per_block)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu_(1)  # j > i: hidden
    first_pad = -(-n // stride)  # key super-tokens from here start past the prompt
    out = torch.zeros(num_heads_kv, num_blocks, num_blocks, dtype=torch.float32,
                      device=q.device)
    for h in range(num_heads_kv):  # one KV head at a time bounds memory
        q_h, k_h = q_s[h * group:(h + 1) * group], k_s[h]
        for r0 in range(0, num_super, chunk):
            r1 = min(r0 + chunk, num_super)
            s = torch.matmul(q_h[:, r0:r1], k_h[:r1].transpose(0, 1))  # [G, C, r1]
            s[..., r0:r1].masked_fill_(tri[:r1 - r0, :r1 - r0], -float("inf"))
            if first_pad < r1:
                s[..., first_pad:].fill_(-float("inf"))
            # fp32 softmax straight from the product's dtype (no fp32 copy of the scores)
            p = torch.softmax(s, dim=-1, dtype=torch.float32)
            mass = p.view(group, (r1 - r0) // per_block, per_block, r1 // per_block,
                          per_block).sum(dim=(0, 2, 4))
            out[h, r0 // per_block:r1 // per_block, :r1 // per_block] = \
                mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    return out


def vertical_slash_block_scores(q: torch.Tensor, k: torch.Tensor, *, block_size: int,
                                last_queries: int = 64, scale: float | None = None
                                ) -> torch.Tensor:
    """MInference's vertical-slash estimate as block scores: q ``[N, Hq, D]``, k ``[N, Hkv, D]``
    -> ``[Hkv, Qb, Qb]`` fp32, causal, each row summing to 1.

    The attention of the last ``last_queries`` queries (the group's heads summed) gives each key
    column's mass (vertical) and each diagonal offset ``i - j``'s mass (slash). A block
    ``(qb, kb)`` scores the vertical mass of its ``block_size`` columns plus the slash mass of
    the diagonals that cross it, each weighted by the share of the block's rows it crosses
    (``1 - |o - t B| / B`` for block diagonal ``t = qb - kb``): the pattern the last queries
    show, assumed for every row. Cost: one ``last_queries x N`` product per KV head."""
    n, num_heads_q, head_dim = q.shape
    num_heads_kv = k.shape[1]
    group = num_heads_q // num_heads_kv
    num_blocks = -(-n // block_size)
    padded = num_blocks * block_size
    last = min(last_queries, n)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = torch.arange(n - last, n, device=q.device)
    keys = torch.arange(n, device=q.device)
    hidden = keys[None, :] > rows[:, None]  # [L, N]: keys after the query
    offsets = (rows[:, None] - keys[None, :]).clamp_min(0)  # [L, N] diagonal i - j
    # Triangle weights of the offsets -B+1 .. B-1 around each block diagonal t * B.
    x = torch.arange(-block_size + 1, block_size, device=q.device, dtype=torch.float32)
    tri = (1.0 - x.abs() / block_size).view(1, 1, -1)
    qb = torch.arange(num_blocks, device=q.device)
    diag = (qb[:, None] - qb[None, :])  # [Qb, Kb] block diagonal t = qb - kb
    causal = diag >= 0
    out = torch.empty(num_heads_kv, num_blocks, num_blocks, dtype=torch.float32,
                      device=q.device)
    q_last = q[n - last:] * scale
    for h in range(num_heads_kv):
        s = torch.einsum("lgd,kd->glk", q_last[:, h * group:(h + 1) * group], k[:, h])
        p = torch.softmax(s.masked_fill(hidden, -float("inf")), dim=-1,
                          dtype=torch.float32).sum(0)  # [L, N]
        vertical = torch.nn.functional.pad(p.sum(0), (0, padded - n))
        vertical = vertical.view(num_blocks, block_size).sum(-1)  # [Kb]
        slash = torch.zeros(padded + block_size, device=q.device).index_add_(
            0, offsets.reshape(-1), p.masked_fill(hidden, 0.0).reshape(-1))
        # Per block diagonal t: the slash mass within B of t * B, triangle-weighted.
        slash = torch.nn.functional.pad(slash, (block_size - 1, 0)).view(1, 1, -1)
        per_diag = torch.nn.functional.conv1d(slash, tri, stride=block_size).view(-1)
        score = vertical[None, :] + per_diag[diag.clamp_min(0)]
        score = score.masked_fill(~causal, 0.0)
        out[h] = score / score.sum(-1, keepdim=True).clamp_min(1e-30)
    return out


def block_scores(q: torch.Tensor, k: torch.Tensor, params: DynamicSparseParams,
                 scale: float | None = None) -> torch.Tensor:
    """The block estimate ``params.method`` names (``[Hkv, Qb, Qb]``, rows summing to 1)."""
    if params.method == "vertical_slash":
        return vertical_slash_block_scores(q, k, block_size=params.block_size,
                                           last_queries=params.last_queries, scale=scale)
    return antidiagonal_block_scores(q, k, block_size=params.block_size, stride=params.stride,
                                     scale=scale)


def select_blocks(scores: torch.Tensor, params: DynamicSparseParams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scores ``[Hkv, Qb, Qb]`` -> ``(block_idx [Hkv, Qb, W] int32, block_count [Hkv, Qb]
    int32)``: the kept causal blocks of each row in ascending order, the diagonal and block 0
    always among them."""
    num_heads_kv, num_blocks, _ = scores.shape
    device = scores.device
    qb = torch.arange(num_blocks, device=device)
    causal = qb[None, :] <= qb[:, None]  # [Qb, Kb]
    masked = scores.masked_fill(~causal, -1.0)  # non-causal blocks sort last
    order = torch.argsort(masked, dim=-1, descending=True)
    ranked = torch.gather(masked, -1, order)
    if params.density is None:
        before = torch.cumsum(ranked.clamp_min(0.0), dim=-1) - ranked.clamp_min(0.0)
        keep_ranked = before < params.threshold  # keep until the mass before reaches it
    else:
        quota = torch.ceil(params.density * (qb + 1).float()).long()  # [Qb]
        keep_ranked = torch.arange(num_blocks, device=device)[None, :] < quota[:, None]
        keep_ranked = keep_ranked.expand(num_heads_kv, -1, -1)
    keep = torch.zeros_like(keep_ranked).scatter_(-1, order, keep_ranked)
    keep &= causal
    keep[:, qb, qb] = True
    keep[:, :, 0] = True
    return blocks_from_mask(keep)


def blocks_from_mask(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool ``[Hkv, Qb, Kb]`` -> ascending block lists ``(block_idx, block_count)`` int32 of
    the kept causal blocks (blocks past the diagonal are dropped)."""
    qb = torch.arange(keep.shape[1], device=keep.device)
    keep = keep & (qb[None, :] <= qb[:, None])
    counts = keep.sum(-1)
    width = max(int(counts.max()), 1) if keep.numel() else 1
    # A stable sort of "not kept" puts the kept block ids first, in ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return order.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def kept_fraction(block_count: torch.Tensor) -> float:
    """Kept blocks over causal blocks (the block density of a selection)."""
    num_blocks = block_count.shape[-1]
    causal = block_count.shape[0] * num_blocks * (num_blocks + 1) // 2
    return float(block_count.sum()) / causal
