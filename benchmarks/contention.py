"""Prefill / decode contention on one device: how much a prefill slows the decode steps that
run at the same time, and how much those steps slow the prefill (``prefill_decode_1gpu.yaml``
puts both replicas on one H200; the simulator's ``shared_gpu`` setups read the factors).

    python -m benchmarks.contention --model random:llama-3.1-8b --device cuda --trianglemix \\
        --mode process --lengths 4096 8192 16384 --decode-batch 1 --decode-context 10240
    python -m benchmarks.contention --model random:tiny-llama --device cpu \\
        --lengths 256 512 --decode-batch 4 --decode-context 256 --repeats 2   # CPU smoke

One ``PrefillEngine`` and one ``DecodeEngine`` on one device. The decode engine holds
``--decode-batch`` sequences of ``--decode-context`` tokens (prefilled by itself first) and
steps them (``DecodeEngine.step``: scheduler, CUDA graphs, sampler, tokens to the host) in a
loop. The defaults are the validation's 1gpu runs (prompts 4-16K, 16 output tokens at
1.2-2.6 req/s: decode holds about one ~10K-token sequence while a prefill runs). Per prompt
length ``L``:

- alone: the prefill (``PrefillEngine.prefill`` of ``L`` random ids, median of ``--repeats``)
  with decode idle; decode steps (median of ``--decode-steps``) with prefill idle;
- together: decode stepping continuously while the same prefills run; the prefill's median
  time, and the median of the decode steps that ran entirely inside a prefill.

``--mode thread`` (default): decode steps on its own thread and CUDA stream, prefill on the
main thread and another stream, in one process (kernels of both may overlap on the GPU).
``--mode process``: decode in a child process (its own CUDA context, as the app's two Ray
replicas are; without MPS the GPU time-slices between contexts). Timestamps are
``time.monotonic`` (one clock for both processes).

``prefill_slowdown`` = together / alone for the prefill, ``decode_slowdown`` likewise for a
decode step; the top-level ``slowdown`` is the median over lengths of each (what
``benchmarks.simulator.costs.load_contention`` reads). Writes
``benchmarks/results/contention.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
from contextlib import nullcontext

import torch

from benchmarks.common import RESULTS_DIR, add_provenance_args, print_table, write_results
from disagg.cli import default_cache_dir
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.kv.block_pool import blocks_for
from disagg.models.loader import load_model, resolve_model
from disagg.prefill.engine import PrefillEngine
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

BLOCK_SIZE = 16


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _load(args):
    source = resolve_model(args.model, cache_dir=default_cache_dir())
    torch.manual_seed(0)
    return load_model(source, device=args.device, dtype=_dtype(args.device))


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _stream(device: str):
    return torch.cuda.Stream() if device.startswith("cuda") else None


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


class DecodeLoop:
    """A ``DecodeEngine`` with ``batch`` running sequences of ``context`` tokens."""

    def __init__(self, model, args):
        c = model.config
        # tokens each sequence may still generate: within the model's context
        self.max_steps = min(args.max_decode_steps, c.max_context_tokens - args.decode_context - 1)
        need = args.decode_batch * blocks_for(args.decode_context + self.max_steps + 2,
                                              BLOCK_SIZE)
        config = DecodeConfig(block_size=BLOCK_SIZE, num_blocks=need,
                              max_num_seqs=max(args.decode_batch, 1),
                              max_num_batched_tokens=args.decode_chunk)
        self.engine = DecodeEngine(model, config, model_name=args.model)
        if args.device.startswith("cuda"):
            self.engine.warm_up()  # kernels compiled, CUDA graphs captured
        params = SamplingParams(max_tokens=self.max_steps, temperature=0.0, ignore_eos=True)
        for b in range(args.decode_batch):
            self.engine.add_request(EngineRequest.create(
                f"d{b}", _ids(args.decode_context, c.vocab_size, 1000 + b), params,
                vocab_size=c.vocab_size, context=c.max_context_tokens))
        self.batch = args.decode_batch
        self.steps = 0
        while True:  # the engine prefills its prompts (chunked), then every step decodes all
            outputs = self.engine.step()
            self.steps += 1
            if len(outputs) == self.batch and self.steps > 1:
                break

    def step(self) -> tuple[float, float]:
        if self.steps >= self.max_steps - 2:
            raise RuntimeError("--max-decode-steps is too small for this run")
        t0 = time.monotonic()
        outputs = self.engine.step()
        t1 = time.monotonic()
        self.steps += 1
        assert len(outputs) == self.batch, "every sequence decodes in every step"
        return t0, t1


class ThreadDecode:
    """Decode steps on a thread of this process, on a CUDA stream of their own."""

    def __init__(self, model, args):
        self.loop = DecodeLoop(model, args)
        self.stream = _stream(args.device)
        self._stop = threading.Event()
        self._thread = None
        self._spans: list[tuple[float, float]] = []

    def alone(self, n: int) -> list[tuple[float, float]]:
        with _on(self.stream):
            return [self.loop.step() for _ in range(n)]

    def start(self) -> None:
        self._stop.clear()
        self._spans = []

        def run():
            with _on(self.stream):
                while not self._stop.is_set():
                    self._spans.append(self.loop.step())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        while len(self._spans) < 2:  # stepping steadily before the prefill starts
            time.sleep(0.001)

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join()
        return list(self._spans)

    def close(self) -> None:
        pass


def _child(args, commands, results) -> None:
    """The decode process: build the loop, then answer ``alone`` / ``start`` / ``stop``."""
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    loop = DecodeLoop(_load(args), args)
    results.put(("ready", None))
    running = threading.Event()
    spans: list = []

    def run():
        while running.is_set():
            spans.append(loop.step())

    worker = None
    while True:
        cmd, n = commands.get()
        if cmd == "alone":
            results.put(("alone", [loop.step() for _ in range(n)]))
        elif cmd == "start":
            spans.clear()
            running.set()
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            while len(spans) < 2:
                time.sleep(0.001)
            results.put(("started", None))
        elif cmd == "stop":
            running.clear()
            worker.join()
            results.put(("stopped", list(spans)))
        else:
            return


class ProcessDecode:
    """Decode steps in a child process (its own CUDA context), driven over queues."""

    def __init__(self, args):
        ctx = mp.get_context("spawn")
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_child, args=(args, self.commands, self.results),
                                daemon=True)
        self.proc.start()
        self._expect("ready")

    def _expect(self, what: str):
        while True:
            try:
                tag, value = self.results.get(timeout=5)
            except Exception:  # noqa: BLE001 (queue.Empty: check the child is alive)
                if not self.proc.is_alive():
                    raise RuntimeError("the decode process died") from None
                continue
            assert tag == what, (tag, what)
            return value

    def alone(self, n: int):
        self.commands.put(("alone", n))
        return self._expect("alone")

    def start(self) -> None:
        self.commands.put(("start", 0))
        self._expect("started")

    def stop(self):
        self.commands.put(("stop", 0))
        return self._expect("stopped")

    def close(self) -> None:
        self.commands.put(("exit", 0))
        self.proc.join(timeout=60)


def _durations(spans) -> list[float]:
    return [t1 - t0 for t0, t1 in spans]


def _inside(spans, windows) -> list[float]:
    """Durations of the decode steps that ran entirely inside one of the prefill windows."""
    return [t1 - t0 for t0, t1 in spans if any(a <= t0 and t1 <= b for a, b in windows)]


def measure(args) -> tuple[list[dict], dict]:
    model = _load(args)
    trianglemix = None
    if args.trianglemix:
        from disagg.attention.triangle import published_trianglemix

        trianglemix = published_trianglemix(args.model)
    prefill = PrefillEngine(model, model_name=args.model, trianglemix=trianglemix)
    from disagg.prefill.warmup import warm_up_prefill

    warm_up_prefill(prefill)
    decode = ProcessDecode(args) if args.mode == "process" else ThreadDecode(model, args)
    stream = _stream(args.device)
    vocab, context = model.config.vocab_size, model.config.max_context_tokens

    def timed_prefills(n: int) -> list[tuple[float, float]]:
        windows = []
        with _on(stream):
            for r in range(args.repeats):
                req = EngineRequest.create(f"p{n}.{r}", _ids(n, vocab, n + r),
                                           SamplingParams(max_tokens=1, temperature=0.0),
                                           vocab_size=vocab, context=context)
                t0 = time.monotonic()
                prefill.prefill(req)  # ends in the sampled token's copy to the host
                windows.append((t0, time.monotonic()))
        return windows

    rows = []
    try:
        for n in args.lengths:
            timed_prefills(n)  # this length's kernels warm
            alone_windows = timed_prefills(n)
            decode_alone = _durations(decode.alone(args.decode_steps))
            decode.start()
            together_windows = timed_prefills(n)
            spans = decode.stop()
            inside = _inside(spans, together_windows)
            row = {
                "prompt_tokens": n, "decode_batch": args.decode_batch,
                "decode_context_tokens": args.decode_context, "repeats": args.repeats,
                "prefill_alone_s": statistics.median(_durations(alone_windows)),
                "prefill_with_decode_s": statistics.median(_durations(together_windows)),
                "decode_step_alone_s": statistics.median(decode_alone),
                "decode_step_with_prefill_s": statistics.median(inside) if inside else None,
                "decode_steps_inside_prefill": len(inside),
                "decode_steps_during_run": len(spans),
            }
            row["prefill_slowdown"] = row["prefill_with_decode_s"] / row["prefill_alone_s"]
            row["decode_slowdown"] = (None if row["decode_step_with_prefill_s"] is None else
                                      row["decode_step_with_prefill_s"]
                                      / row["decode_step_alone_s"])
            rows.append(row)
            print(row, flush=True)
    finally:
        decode.close()
    decode_factors = [r["decode_slowdown"] for r in rows if r["decode_slowdown"] is not None]
    slowdown = {"prefill": statistics.median(r["prefill_slowdown"] for r in rows),
                "decode": statistics.median(decode_factors) if decode_factors else 1.0}
    return rows, slowdown


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--mode", choices=("thread", "process"), default="thread")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--trianglemix", action="store_true",
                   help="prefill with the model's published TriangleMix split (as the 1gpu YAML)")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-context", type=int, default=10240)
    p.add_argument("--decode-chunk", type=int, default=2048,
                   help="decode's max_num_batched_tokens (its own prefill of the batch)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed steps alone")
    p.add_argument("--max-decode-steps", type=int, default=4096,
                   help="tokens each decode sequence may generate (KV sized for it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine on CPU")
    add_provenance_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    rows, slowdown = measure(args)
    out = args.out or RESULTS_DIR / "contention.json"
    path = write_results("contention", rows, commit=args.commit, dirty=args.dirty, out=out,
                         extra={"model": args.model, "device_arg": args.device,
                                "mode": args.mode, "trianglemix": args.trianglemix,
                                "dtype": str(_dtype(args.device)).removeprefix("torch."),
                                "slowdown": slowdown})
    print_table(rows, ["prompt_tokens", "prefill_alone_s", "prefill_with_decode_s",
                       "prefill_slowdown", "decode_step_alone_s",
                       "decode_step_with_prefill_s", "decode_slowdown"])
    print(f"slowdown: {slowdown}\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
