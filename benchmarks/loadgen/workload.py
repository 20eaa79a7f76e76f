"""What a benchmark sends: arrival times and prompt / output lengths, shared by the HTTP load
generator (``benchmarks.serve``) and the cluster simulator (``benchmarks.simulator``).

Length distributions are written as short specs (one grammar for the CLI and the code):
``fixed:512``, ``uniform:256:1024`` (inclusive), ``lognormal:16384:0.8[:min[:max]]`` (median
and sigma of the log; clamped), ``mix:0.9*lognormal:16384:0.8,0.1*fixed:131072``. Arrivals:
Poisson at a rate, gamma with a burstiness factor (vLLM's convention: shape = burstiness,
mean gap 1 / rate; burstiness 1 is Poisson, < 1 burstier), all at once (rate ``inf``), or the
times of a JSONL trace (``{"arrival_s", "prompt_tokens", "output_tokens"}`` per line).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts (``parse_lengths`` builds one from a spec)."""

    kind: str  # fixed | uniform | lognormal | mix
    params: tuple[float, ...] = ()
    parts: tuple[tuple[float, LengthDist], ...] = ()  # mix: (weight, component)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.params[0]), dtype=np.int64)
        if self.kind == "uniform":
            lo, hi = int(self.params[0]), int(self.params[1])
            return rng.integers(lo, hi + 1, size=n, dtype=np.int64)
        if self.kind == "lognormal":
            median, sigma, lo, hi = self.params
            x = np.exp(rng.normal(math.log(median), sigma, size=n))
            return np.clip(np.rint(x), lo, hi).astype(np.int64)
        weights = np.array([w for w, _ in self.parts], dtype=float)
        which = rng.choice(len(self.parts), size=n, p=weights / weights.sum())
        out = np.empty(n, dtype=np.int64)
        for i, (_, part) in enumerate(self.parts):
            mask = which == i
            out[mask] = part.sample(rng, int(mask.sum()))
        return out

    def spec(self) -> str:
        if self.kind == "mix":
            return "mix:" + ",".join(f"{w:g}*{p.spec()}" for w, p in self.parts)
        return ":".join([self.kind, *(f"{x:g}" for x in self.params)])


def parse_lengths(spec: str) -> LengthDist:
    """``fixed:N`` | ``uniform:LO:HI`` | ``lognormal:MEDIAN:SIGMA[:MIN[:MAX]]`` | ``mix:W*SPEC,...``"""
    kind, _, rest = spec.partition(":")
    if kind == "mix":
        parts = []
        for item in _split_mix(rest):
            weight, _, sub = item.partition("*")
            parts.append((float(weight), parse_lengths(sub)))
        if not parts or any(w <= 0 for w, _ in parts):
            raise ValueError(f"mix needs positive weights: {spec!r}")
        return LengthDist("mix", parts=tuple(parts))
    values = [float(x) for x in rest.split(":")] if rest else []
    if kind == "fixed" and len(values) == 1 and values[0] >= 1:
        return LengthDist("fixed", tuple(values))
    if kind == "uniform" and len(values) == 2 and 1 <= values[0] <= values[1]:
        return LengthDist("uniform", tuple(values))
    if kind == "lognormal" and 2 <= len(values) <= 4 and values[0] >= 1 and values[1] >= 0:
        lo = values[2] if len(values) > 2 else 1.0
        hi = values[3] if len(values) > 3 else float("inf")
        return LengthDist("lognormal", (values[0], values[1], lo, hi))
    raise ValueError(f"bad length spec {spec!r} (fixed:N, uniform:LO:HI, "
                     "lognormal:MEDIAN:SIGMA[:MIN[:MAX]], mix:W*SPEC,...)")


def _split_mix(rest: str) -> list[str]:
    """Split ``0.9*a:1,0.1*mix:...`` on top-level commas (a nested mix keeps its own)."""
    if "mix:" in rest:
        raise ValueError("nested mix specs are not supported")
    return [p for p in rest.split(",") if p]


@dataclass(frozen=True)
class WorkItem:
    """One request to send: when (seconds after the start; None = as soon as a slot frees)
    and how long its prompt and output are."""

    index: int
    arrival_s: float | None
    prompt_tokens: int
    output_tokens: int


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator
                  ) -> np.ndarray:
    """``n`` arrival offsets (s) of a renewal process at ``rate`` req/s; gaps are
    gamma(shape=burstiness, mean=1/rate) (exponential at burstiness 1). The first request
    goes at time 0; rate ``inf`` sends everything at once."""
    if n == 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def synthetic(n: int, prompt: LengthDist, output: LengthDist, *, rate: float | None,
              burstiness: float = 1.0, seed: int = 0) -> list[WorkItem]:
    """``n`` requests; ``rate=None`` leaves arrivals open (closed-loop concurrency)."""
    rng = np.random.default_rng(seed)
    prompts = prompt.sample(rng, n)
    outputs = output.sample(rng, n)
    times = arrival_times(n, rate, burstiness, rng) if rate is not None else [None] * n
    return [WorkItem(i, None if t is None else float(t), int(p), int(o))
            for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]


def load_trace(path: Path) -> list[WorkItem]:
    """A JSONL trace: one ``{"arrival_s", "prompt_tokens", "output_tokens"}`` object per
    line (``arrival_s`` may be omitted for closed-loop runs); sorted by arrival."""
    items = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        arrival = obj.get("arrival_s")
        items.append((None if arrival is None else float(arrival), int(obj["prompt_tokens"]),
                      int(obj["output_tokens"])))
    items.sort(key=lambda x: (x[0] is not None, x[0] or 0.0))
    return [WorkItem(i, t, p, o) for i, (t, p, o) in enumerate(items)]


def write_trace(items: list[WorkItem], path: Path) -> None:
    lines = [json.dumps({"arrival_s": w.arrival_s, "prompt_tokens": w.prompt_tokens,
                         "output_tokens": w.output_tokens}) for w in items]
    Path(path).write_text("\n".join(lines) + "\n")
