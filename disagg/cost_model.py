"""The cost model the router plans with: seconds of prefill, decode steps and KV transfer.

- Prefill of ``n`` prompt tokens, for a model whose layers are a ``triangle_fraction`` Triangle
  (TriangleMix) and the rest dense:
  ``fixed_s + n * per_token_s + (1 - triangle_fraction) * n**2 * per_token2_s
  + triangle_fraction * n * triangle_per_token_s``. Dense attention is the quadratic term;
  a Triangle layer's attention is nearly linear (sink + window + last rows), so it moves the
  quadratic share of its layers into a linear one.
- Sequence parallelism over ``sp`` ranks divides that compute by ``sp * sp_efficiency`` and
  adds ``sp_per_token_s * n`` of exchange (``sp = 1``: neither).
- A decode step of ``batch`` sequences holding ``context_tokens`` KV tokens in all:
  ``fixed_s + batch * per_seq_s + context_tokens * per_context_token_s``.
- The exposed KV transfer of ``b`` bytes over a backend (after token 0, before token 1):
  ``fixed_s + b * s_per_byte``.
- ``remote_overhead_s``: what the disaggregated path adds before token 0 over the local one
  (the decode -> prefill hop, reserving blocks, offering destinations).

Coefficients are fitted (``fit_*`` below, least squares with non-negative terms) from the
measured ``benchmarks/results/*.json``; ``cpu_default()`` / ``gpu_default()`` hold the fits
with their sources named (``tests/routing/test_cost_model.py`` re-fits the files and checks the
stored numbers). A served model of another size than the fitted one is scaled by its shape
(``ModelShape``: linear terms by the weights' FLOPs per token, quadratic by attention width,
fixed terms by layers), and CPU replicas by their thread count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class PrefillCost:
    fixed_s: float
    per_token_s: float
    per_token2_s: float  # dense attention, per token squared
    triangle_per_token_s: float = 0.0  # a Triangle layer's attention, per token

    def seconds(self, num_tokens: int, *, triangle_fraction: float = 0.0) -> float:
        n = float(num_tokens)
        return (self.fixed_s + n * self.per_token_s
                + (1.0 - triangle_fraction) * n * n * self.per_token2_s
                + triangle_fraction * n * self.triangle_per_token_s)


@dataclass(frozen=True)
class DecodeCost:
    fixed_s: float
    per_seq_s: float
    per_context_token_s: float

    def step_s(self, batch: int, context_tokens: int) -> float:
        return self.fixed_s + batch * self.per_seq_s + context_tokens * self.per_context_token_s


@dataclass(frozen=True)
class TransferCost:
    backend: str
    fixed_s: float
    s_per_byte: float

    def seconds(self, num_bytes: int) -> float:
        return self.fixed_s + num_bytes * self.s_per_byte


@dataclass(frozen=True)
class ModelShape:
    """What the costs scale with, from a model config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> ModelShape:
        """From a ``disagg.models.config.ModelConfig`` (or anything with its fields)."""
        return cls(config.num_layers, config.hidden_size, config.intermediate_size,
                   config.num_heads, config.num_kv_heads, config.head_dim)

    @property
    def linear_flops_per_token(self) -> float:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2.0 * self.num_layers * (h * (2 * q + 2 * kv) + 3 * h * self.intermediate_size)

    @property
    def attention_width(self) -> float:
        return float(self.num_layers * self.num_heads * self.head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


@dataclass(frozen=True)
class CostModel:
    prefill: PrefillCost
    decode: DecodeCost
    transfers: tuple[TransferCost, ...]
    remote_overhead_s: float
    shape: ModelShape  # the model the coefficients were measured on
    threads: int = 0  # CPU threads of the measurement (0: a GPU measurement)
    sp_efficiency: float = 0.9
    sp_per_token_s: float = 0.0
    source: str = ""

    def prefill_s(self, num_tokens: int, *, triangle_fraction: float = 0.0, sp: int = 1
                  ) -> float:
        seconds = self.prefill.seconds(num_tokens, triangle_fraction=triangle_fraction)
        if sp <= 1:
            return seconds
        return seconds / (sp * self.sp_efficiency) + num_tokens * self.sp_per_token_s

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode.step_s(batch, context_tokens)

    def transfer_s(self, num_bytes: int, backend: str | None = None) -> float:
        """Exposed transfer over ``backend`` (default: the first, the preferred one)."""
        for t in self.transfers:
            if backend is None or t.backend == backend:
                return t.seconds(num_bytes)
        return self.transfers[-1].seconds(num_bytes) if self.transfers else 0.0

    def for_model(self, shape: ModelShape, *, threads: int | None = None) -> CostModel:
        """This model's coefficients scaled to a model of ``shape`` (and, measured on CPU, to
        replicas running ``threads`` threads: compute scales inversely with them)."""
        lin = shape.linear_flops_per_token / self.shape.linear_flops_per_token
        att = shape.attention_width / self.shape.attention_width
        lay = shape.num_layers / self.shape.num_layers
        kv = shape.kv_bytes_per_token / self.shape.kv_bytes_per_token
        cpu = self.threads / threads if self.threads and threads else 1.0
        p, d = self.prefill, self.decode
        return replace(
            self, shape=shape, threads=threads or self.threads,
            prefill=PrefillCost(p.fixed_s * lay * cpu, p.per_token_s * lin * cpu,
                                p.per_token2_s * att * cpu, p.triangle_per_token_s * att * cpu),
            decode=DecodeCost(d.fixed_s * lin * cpu, d.per_seq_s * lin * cpu,
                              d.per_context_token_s * kv * cpu),
            sp_per_token_s=self.sp_per_token_s * kv,
            source=f"{self.source} (scaled to {shape})")


def nonnegative_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0 (active set: a negative one is dropped and
    the rest refitted), so a term the data cannot see comes out 0, not negative."""
    active = list(range(features.shape[1]))
    coef = np.zeros(features.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(features[:, active], target, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def fit_prefill(rows: Sequence[tuple[int, int, float, float]]) -> PrefillCost:
    """From (num_sequences, tokens per sequence, triangle_fraction, seconds) measurements:
    dense rows fix the fixed, linear and quadratic terms, Triangle rows the Triangle term."""
    dense = [(b, n, s) for b, n, f, s in rows if f == 0.0]
    x = np.array([[1.0, b * n, b * n * n] for b, n, _ in dense])
    fixed, lin, quad = nonnegative_lstsq(x, np.array([s for *_, s in dense]))
    tri = [(b, n, f, s) for b, n, f, s in rows if f > 0.0]
    t = 0.0
    if tri:
        residual = np.array([s - fixed - b * n * lin - (1 - f) * b * n * n * quad
                             for b, n, f, s in tri])
        t = float(nonnegative_lstsq(np.array([[f * b * n] for b, n, f, _ in tri]), residual)[0])
    return PrefillCost(float(fixed), float(lin), float(quad), t)


def fit_decode(rows: Sequence[tuple[int, int, float]]) -> DecodeCost:
    """From (batch, context tokens per sequence, step seconds) measurements. Rows of one
    context length cannot tell KV reads from per-sequence work: the context term is then 0."""
    one_context = len({c for _, c, _ in rows}) == 1
    x = np.array([[1.0, b] + ([] if one_context else [b * c]) for b, c, _ in rows])
    coef = nonnegative_lstsq(x, np.array([s for *_, s in rows]))
    return DecodeCost(float(coef[0]), float(coef[1]), 0.0 if one_context else float(coef[2]))


def fit_transfer(backend: str, rows: Sequence[tuple[int, float]]) -> TransferCost:
    """From (bytes, exposed seconds) measurements of one backend."""
    x = np.array([[1.0, float(b)] for b, _ in rows])
    fixed, per_byte = nonnegative_lstsq(x, np.array([s for _, s in rows]))
    return TransferCost(backend, float(fixed), float(per_byte))


@dataclass
class PrefillCalibration:
    """Measured / predicted prefill seconds, smoothed in log space: scales the fitted prefill
    to the machine as it runs now (CPUs shared with other work, another GPU than the fit's).
    Fed with each disaggregated request's measured prefill (its ``disagg_timing``)."""

    weight: float = 0.2  # of the newest observation
    lo: float = 0.25
    hi: float = 4.0
    factor: float = 1.0

    def observe(self, predicted_s: float, measured_s: float) -> None:
        if predicted_s <= 0 or measured_s <= 0:
            return
        ratio = min(self.hi, max(self.lo, measured_s / predicted_s))
        self.factor = float(np.exp((1 - self.weight) * np.log(self.factor)
                                   + self.weight * np.log(ratio)))

    def apply(self, cost: CostModel) -> CostModel:
        p, f = cost.prefill, self.factor
        return replace(cost, prefill=PrefillCost(p.fixed_s * f, p.per_token_s * f,
                                                 p.per_token2_s * f, p.triangle_per_token_s * f))
