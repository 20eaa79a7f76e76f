"""Batched keyed sampling on the device: the tokens of ``disagg.sampling.sample``, one row per
sequence, with one device-to-host transfer for the whole batch.

Every row follows ``sample_token``'s steps with the same tensor operations, so a row's token
equals what ``sample`` picks from the same logits (the prefill side samples token 0 with it):
1. greedy rows (temperature 0): ``argmax`` of the raw logits;
2. others: softmax of ``logits / T``; stable descending sort; top-k and top-p become masks over
   the sorted row instead of slices (a masked tail adds exact zeros to every cumulative sum);
3. the draw ``keyed_uniform(seed, step)`` (splitmix64, computed here on int64 tensors) times the
   kept mass, looked up in the fp64 cumulative sum, clamped to the kept prefix;
4. log-probabilities of the raw logits: the sampled token's and the top ``n``.
The host knows which of these a batch needs (any random row, the most logprobs asked), so no
step reads the device to decide what to run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from disagg.sampling import SampledToken, SamplingParams

_MASK64 = (1 << 64) - 1
_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _signed64(x: int) -> int:
    """The int64 with the bits of ``x mod 2**64`` (torch integers wrap like uint64)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_C1, _C2, _C3 = (_signed64(c) for c in _SPLITMIX)


def _shift_right(z: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (z >> n) & ((1 << (64 - n)) - 1)


def keyed_uniform_tensor(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``disagg.sampling.keyed_uniform`` elementwise: int64 ``seeds`` (as ``_signed64``) and
    ``steps`` -> fp64 draws in [0, 1)."""
    z = seeds * _C1 + (steps + 1) * _C2
    z = (z ^ _shift_right(z, 30)) * _C2
    z = (z ^ _shift_right(z, 27)) * _C3
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 11).double() / float(1 << 53)


def _scale_by_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    # ``sample_token`` divides by a Python float. torch computes that as a true division on the
    # CPU but as a multiplication by the fp32 reciprocal on CUDA (its scalar-divisor fast
    # path); a per-row tensor divisor would take neither, so mirror each device's path.
    if logits.is_cuda:
        return logits * torch.reciprocal(temperature)[:, None]
    return logits / temperature[:, None]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` of ``[R, V]`` (int64 ``[R]``, the first maximum; NaN
    counts as the maximum, as there), in two stages when V splits into 256-2048 equal chunks:
    torch's one-stage reduction gives a few rows one block each (27 us for one 128K-vocab row
    on an H200, against a 5 ms decode step)."""
    rows, vocab = logits.shape
    width = _chunk_width(vocab)
    if width is None or rows * (vocab // width) > 65536:
        return torch.argmax(logits, dim=-1)
    best, index = logits.view(rows, vocab // width, width).max(dim=-1)  # first max per chunk
    chunk = torch.argmax(best, dim=-1, keepdim=True)  # the first chunk holding the maximum
    return (chunk * width + index.gather(1, chunk))[:, 0]


@functools.cache
def _chunk_width(vocab: int) -> int | None:
    """The widest chunk of 256-2048 columns that splits ``vocab`` into at least 8 equal ones."""
    return next((w for w in range(2048, 255, -1) if vocab % w == 0 and vocab // w >= 8), None)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                top_k: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, *,
                any_random: bool, num_logprobs: int | None) -> torch.Tensor:
    """Sample every row of fp32 ``logits [R, V]`` with its own parameters (``[R]`` tensors on
    the logits' device: fp32 temperature and top_p, int64 top_k, seeds, steps).

    Returns fp64 ``[R, C]``: column 0 the token id; with ``num_logprobs`` set, column 1 its
    log-probability and then ``num_logprobs`` top ids and ``num_logprobs`` top log-probs.
    """
    packed, _ = _sample_rows(logits, temperature, top_p, top_k, seeds, steps,
                             any_random=any_random, num_logprobs=num_logprobs)
    return packed.double()


def _sample_rows(logits, temperature, top_p, top_k, seeds, steps, *, any_random: bool,
                 num_logprobs: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_rows``, and the token ids as int64 ``[R]``; with no logprobs asked the packed
    result is those ids as int64 ``[R, 1]`` (one kernel fewer on the decode step's path)."""
    token = argmax_rows(logits)
    if any_random:
        vocab = logits.shape[-1]
        greedy = temperature == 0
        scaled = _scale_by_temperature(logits, torch.where(greedy, 1.0, temperature))
        probs, ids = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True,
                                stable=True)
        rank = torch.arange(vocab, device=logits.device)
        num_top = torch.where(top_k > 0, torch.clamp(top_k, max=vocab), vocab)
        probs = torch.where(rank < num_top[:, None], probs, 0.0)
        before = torch.cumsum(probs, dim=-1) - probs
        in_nucleus = ((before < top_p[:, None]) & (rank < num_top[:, None])).sum(-1)
        num_kept = torch.where(top_p < 1.0, in_nucleus, num_top)
        cdf = torch.cumsum(torch.where(rank < num_kept[:, None], probs, 0.0).double(), dim=-1)
        target = keyed_uniform_tensor(seeds, steps) * cdf.gather(1, (num_kept - 1)[:, None])[:, 0]
        index = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
        index = torch.minimum(index, num_kept - 1)
        sampled = ids.gather(1, index[:, None])[:, 0]
        token = torch.where(greedy, token, sampled)
    if num_logprobs is None:
        return token[:, None], token
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    columns = [token.double()[:, None], logprobs.gather(1, token[:, None]).double()]
    if num_logprobs:
        top = logprobs.topk(num_logprobs, dim=-1)
        columns += [top.indices.double(), top.values.double()]
    return torch.cat(columns, dim=1), token


@dataclass(frozen=True)
class RowRequest:
    """What one row is sampled with: the request's parameters, seed, generated-token index."""

    params: SamplingParams
    seed: int
    step: int


@dataclass
class PendingSample:
    """A batch's sampling launched on the device and not yet read: ``token_ids`` (device
    int64 ``[R]``, usable by the next forward at once) and the packed rows on their way to the
    host (pinned on CUDA; readable once ``done`` has passed)."""

    rows: tuple[RowRequest, ...]
    token_ids: torch.Tensor
    packed: torch.Tensor
    done: torch.cuda.Event | None


class Sampler:
    """Per-row sampling parameters in persistent buffers (pinned on CUDA), copied to the device
    in two transfers; the sampled batch comes back in one.

    The host buffers are double-buffered: a batch's parameters may still be on their way to
    the device (behind the forward that precedes them) while the next batch's are written."""

    def __init__(self, max_rows: int, device: torch.device):
        self.device = device
        pin = device.type == "cuda"
        self._pin = pin
        self._host_f = [torch.zeros(2, max_rows, dtype=torch.float32, pin_memory=pin)
                        for _ in range(2)]
        self._host_i = [torch.zeros(3, max_rows, dtype=torch.int64, pin_memory=pin)
                        for _ in range(2)]
        self._copied = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._slot = 0
        self._dev_f = torch.zeros(2, max_rows, dtype=torch.float32, device=device)
        self._dev_i = torch.zeros(3, max_rows, dtype=torch.int64, device=device)
        self.max_rows = max_rows

    def sample(self, logits: torch.Tensor, rows: Sequence[RowRequest]) -> list[SampledToken]:
        """Sample ``logits [R, V]`` (fp32; R >= len(rows), extra rows ignored)."""
        return self.read(self.launch(logits, rows))

    def launch(self, logits: torch.Tensor, rows: Sequence[RowRequest]) -> PendingSample:
        """Queue the sampling of ``logits [R, V]``'s first ``len(rows)`` rows and the transfer
        of its result to the host; waits for nothing on the device."""
        n = len(rows)
        if n > self.max_rows:
            raise ValueError(f"{n} rows to sample, the sampler holds {self.max_rows}")
        any_random = any(r.params.temperature > 0 for r in rows)
        if any_random:  # greedy rows read no parameter: a greedy batch copies none
            slot = self._slot = 1 - self._slot
            if self._copied[slot] is not None:
                self._copied[slot].synchronize()  # two batches ago: long done
            host_f, host_i = self._host_f[slot], self._host_i[slot]
            f, i = host_f.numpy(), host_i.numpy()
            f[0, :n] = [r.params.temperature for r in rows]
            f[1, :n] = [r.params.top_p for r in rows]
            i[0, :n] = [r.params.top_k for r in rows]
            i[1, :n] = [_signed64(r.seed) for r in rows]
            i[2, :n] = [r.step for r in rows]
            self._dev_f.copy_(host_f, non_blocking=True)  # whole buffers: contiguous
            self._dev_i.copy_(host_i, non_blocking=True)
            if self._copied[slot] is not None:
                self._copied[slot].record()
        asked = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        packed, token_ids = _sample_rows(
            logits[:n], self._dev_f[0, :n], self._dev_f[1, :n], self._dev_i[0, :n],
            self._dev_i[1, :n], self._dev_i[2, :n], any_random=any_random,
            num_logprobs=max(asked) if asked else None)
        done = None
        if self._pin:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            packed = host
        return PendingSample(tuple(rows), token_ids, packed, done)

    def read(self, pending: PendingSample) -> list[SampledToken]:
        """The tokens of a launched batch (waits for its transfer)."""
        if pending.done is not None:
            pending.done.synchronize()
        packed = pending.packed.numpy()
        return [_token(packed[b], r.params.logprobs) for b, r in enumerate(pending.rows)]


def _token(row: np.ndarray, num_logprobs: int | None) -> SampledToken:
    token_id = int(row[0])
    if num_logprobs is None:
        return SampledToken(token_id)
    width = (len(row) - 2) // 2
    ids, values = row[2:2 + num_logprobs], row[2 + width:2 + width + num_logprobs]
    return SampledToken(token_id, float(row[1]),
                        tuple(zip((int(x) for x in ids), (float(x) for x in values))))
