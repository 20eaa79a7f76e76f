"""Profiles of a prefill replica's first served prefills: what a first long request pays that
the next one does not, seen in the process that pays it. A diagnostic, off unless asked for.

``DISAGG_PROFILE_PREFILLS=DIR`` in a prefill replica's environment (GPU replicas get an
operator's value through ``deployments.serve_env.gpu_env``) makes the replica profile its
first ``count`` (2) served prefills of at least ``min_tokens`` tokens (default 0: any prompt
the router sends it; warm-ups excluded) with torch.profiler, on the worker thread that runs
them. Each writes ``DIR/prefill_<pid>_<n>.json``: the prompt length, the milliseconds under
the profiler, Python's garbage collections meanwhile (``GCPauses``) and, per event, its self
CPU and self device microseconds and its call count; a file that cannot be written is logged,
and the request goes on. ``profile_diff`` ranks the
events by how much more the first of two spent (``benchmarks/served_decode.py
--profile-prefills DIR`` prints it per replica; ``benchmarks/first_prefill.py --profile`` does
the same in one process). The profiler slows what it watches: profile in a run of its own.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import torch

from disagg.request import EngineRequest

PROFILE_PREFILLS_ENV = "DISAGG_PROFILE_PREFILLS"
logger = logging.getLogger(__name__)

EventTimes = dict[str, tuple[float, float, int]]  # event: (self CPU us, self device us, calls)


class FirstPrefillProfiler:
    """Profiles the first ``count`` prefills of at least ``min_tokens`` tokens it is handed."""

    def __init__(self, out_dir: str | os.PathLike, device: torch.device, *, count: int = 2,
                 min_tokens: int = 0):
        self.out_dir = Path(out_dir)
        self.device = device
        self.count = count
        self.min_tokens = min_tokens
        self.written: list[Path] = []

    @classmethod
    def from_env(cls, device: torch.device) -> FirstPrefillProfiler | None:
        """One writing to ``$DISAGG_PROFILE_PREFILLS``, or None where it is not set."""
        out_dir = os.environ.get(PROFILE_PREFILLS_ENV)
        return cls(out_dir, device) if out_dir else None

    @contextmanager
    def around(self, request: EngineRequest) -> Iterator[None]:
        """Profile what runs inside, if ``request`` is one of the prefills to profile."""
        if len(self.written) >= self.count or request.num_prompt_tokens < self.min_tokens:
            yield
            return
        t0 = time.perf_counter()
        with GCPauses() as gc_pauses, torch_profiler(self.device) as prof:
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        path = self.out_dir / f"prefill_{os.getpid()}_{len(self.written)}.json"
        try:  # a diagnostic: the prefill it watched has succeeded either way
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "pid": os.getpid(), "index": len(self.written),
                "request_id": request.request_id, "prompt_tokens": request.num_prompt_tokens,
                "profiled_ms": elapsed_ms, "gc_pauses": gc_pauses.pauses,
                "events": event_times(prof)}))
        except OSError as e:
            logger.warning("prefill profile %s not written: %s", path, e)
        self.written.append(path)  # counted even if unwritten: profile only the first ones


def torch_profiler(device: torch.device):
    """A torch.profiler of CPU ops, and of kernels too where ``device`` is CUDA."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return profile(activities=activities)


class GCPauses:
    """Python's cyclic garbage collections while inside, any thread's: ``pauses`` holds one
    ``[generation, milliseconds]`` each. A collection stops every thread that needs the GIL;
    the oldest generation's walks every tracked object of the process."""

    def __init__(self):
        self.pauses: list[list[float]] = []
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append([info["generation"],
                                (time.perf_counter() - self._started) * 1e3])
            self._started = None

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def event_times(prof) -> EventTimes:
    """Per event key of a finished torch.profiler run: self CPU us, self device us, calls."""
    return {e.key: (e.self_cpu_time_total, e.self_device_time_total, e.count)
            for e in prof.key_averages()}


def profile_diff(first: EventTimes, second: EventTimes, top: int = 25) -> list[dict]:
    """The events whose self CPU or self device microseconds differ most, first minus second."""
    zero = (0.0, 0.0, 0)
    rows = []
    for key in sorted(set(first) | set(second)):
        a, b = first.get(key, zero), second.get(key, zero)
        rows.append({"event": key, "cpu_us": a[0] - b[0], "device_us": a[1] - b[1],
                     "calls": [a[2], b[2]]})
    by_cpu = sorted(rows, key=lambda r: -abs(r["cpu_us"]))[:top]
    by_device = sorted(rows, key=lambda r: -abs(r["device_us"]))[:top]
    return by_cpu + [r for r in by_device if r not in by_cpu]


def replica_diffs(out_dir: str | os.PathLike, top: int = 25) -> list[dict]:
    """Per process that wrote two profiles or more to ``out_dir``: its first two prompts'
    lengths and profiled milliseconds, and ``profile_diff`` of the first against the second."""
    by_pid: dict[int, list[dict]] = {}
    for path in sorted(Path(out_dir).glob("prefill_*.json")):
        record = json.loads(path.read_text())
        by_pid.setdefault(record["pid"], []).append(record)
    out = []
    for pid, records in sorted(by_pid.items()):
        if len(records) < 2:
            continue
        first, second = sorted(records, key=lambda r: r["index"])[:2]
        out.append({"pid": pid, "prompt_tokens": [first["prompt_tokens"], second["prompt_tokens"]],
                    "profiled_ms": [first["profiled_ms"], second["profiled_ms"]],
                    "gc_pauses": [first["gc_pauses"], second["gc_pauses"]],
                    "diff": profile_diff(first["events"], second["events"], top)})
    return out


def diff_lines(rows: list[dict]) -> list[str]:
    """``profile_diff``'s rows as a table to print."""
    lines = [f"{'event (first - second)':60s} {'cpu us':>10s} {'device us':>10s}  calls"]
    lines += [f"{r['event'][:60]:60s} {r['cpu_us']:10.0f} {r['device_us']:10.0f}  {r['calls']}"
              for r in rows]
    return lines
