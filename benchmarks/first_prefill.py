"""The first long prefill after warm-up against the ones after it, in one process, as a prefill
replica runs them: no Ray, no HTTP, so what is left of a first-request cost is the engine's.

As a GPU prefill replica does: CUDA started with CUDA's lazy module loading (each kernel loaded
at its first launch) unless ``CUDA_MODULE_LOADING`` is exported, as a replica gets an operator's
value (``deployments.serve_env.gpu_env``), or ``--module-loading EAGER|LAZY`` sets it; the model
and the TriangleMix engine built, then on one worker thread (cuDNN keeps its plans per thread)
``warm_up_prefill`` and one short prefill through the writer (decode's start-up request through
prefill), then prompts of ``--lengths`` tokens one after another (default 32768, 32767, 32766:
as with users' prompts no length repeats), each written layer by layer into a decode-pool
stand-in by the ``inprocess`` direct writer (the same ``DirectKVWriter`` as ``cuda_ipc``'s: a
copy stream, ``record_stream`` on each layer's K/V). Per prompt: the engine's prefill seconds
(what the served breakdown calls ``prefill_s``) and the caching allocator's new segments (each a
``cudaMalloc`` inside the request). ``--profile``: the first two prompts also run under
torch.profiler; the events whose self CPU or self CUDA time differ most between them are printed
and kept.

    python -m benchmarks.first_prefill [--lengths 32768,32767,32766] [--profile]
        [--module-loading EAGER]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from benchmarks.common import add_provenance_args, print_table, write_results
from deployments.serve_env import CUDA_MODULE_LOADING_ENV
from disagg.attention.triangle import published_trianglemix
from disagg.models.loader import ModelSource, load_model
from disagg.prefill.engine import PrefillEngine
from disagg.prefill.profiling import diff_lines, event_times, profile_diff, torch_profiler
from disagg.prefill.warmup import warm_up_prefill
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.base import KVDestination, KVHeader
from disagg.transport.direct import INPROCESS, DirectKVWriter


def _segments() -> int:
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.memory_stats().get("segment.all.allocated", 0)


class PoolStandIn:
    """Decode's pool layout (per layer one ``[rows, Hkv, D]`` K and V tensor) for the writer."""

    def __init__(self, engine: PrefillEngine, rows: int):
        cfg, dev = engine.model.config, engine.device
        shape = (rows, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=engine.layout.dtype, device=dev)
                  for _ in range(cfg.num_layers)]
        self.v = [torch.empty_like(t) for t in self.k]

    def writer(self, request: EngineRequest) -> DirectKVWriter:
        n = request.num_prompt_tokens
        destination = KVDestination(request.request_id, INPROCESS, "first-prefill",
                                    ((0, 0, n),), n, time.time() + 600)
        return DirectKVWriter(destination, self.k, self.v, backend=INPROCESS,
                              num_layers=len(self.k))


def run_one(engine: PrefillEngine, pool: PoolStandIn, request: EngineRequest) -> dict:
    """One prefill into the pool: the engine's seconds and the allocator's new segments."""
    before = _segments()
    writer = pool.writer(request)
    result = engine.prefill(request, writer)
    writer.finish(KVHeader(request.request_id, result.fingerprint, result.first_token))
    return {"prompt_tokens": request.num_prompt_tokens, "prefill_ms": result.prefill_s * 1e3,
            "new_segments": _segments() - before}


def profiled(engine: PrefillEngine, pool: PoolStandIn, request: EngineRequest):
    with torch_profiler(engine.device) as prof:
        row = run_one(engine, pool, request)
    return row, event_times(prof)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="random config name")
    parser.add_argument("--lengths", default="32768,32767,32766")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--module-loading", choices=("EAGER", "LAZY"),
                        help="CUDA_MODULE_LOADING (default: the environment's, else lazy)")
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.module_loading:  # before CUDA starts
        os.environ[CUDA_MODULE_LOADING_ENV] = args.module_loading
    lengths = [int(x) for x in args.lengths.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = ModelSource(name=f"random:{args.model}", random_config=args.model)
    model = load_model(source, device=device, dtype=dtype)
    config = model.config
    engine = PrefillEngine(model, model_name=source.name,
                           trianglemix=published_trianglemix(args.model))
    pool = PoolStandIn(engine, max(lengths))
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")
    report = worker.submit(warm_up_prefill, engine).result()
    g = torch.Generator().manual_seed(2)
    startup = EngineRequest.create("warmup-writer", list(range(1, 17)),
                                   SamplingParams(temperature=0.0, max_tokens=1),
                                   vocab_size=config.vocab_size, context=config.max_context_tokens)
    worker.submit(run_one, engine, pool, startup).result()
    rows, diff = [], None
    for i, n in enumerate(lengths):
        request = EngineRequest.random_prefill(f"r{i}", n, vocab_size=config.vocab_size,
                                               context=config.max_context_tokens, generator=g)
        if args.profile and i < 2:
            row, events = worker.submit(profiled, engine, pool, request).result()
            diff = events if i == 0 else profile_diff(diff, events)
        else:
            row = worker.submit(run_one, engine, pool, request).result()
        rows.append({"request": i, **row})
    if len(rows) > 1:
        rows[0]["first_minus_second_ms"] = rows[0]["prefill_ms"] - rows[1]["prefill_ms"]
    write_results("first_prefill", rows, commit=args.commit, dirty=args.dirty, out=args.out,
                  extra={"model": source.name, "warmup_prompt_lengths": list(report.prompt_lengths),
                         "warmup_s": report.seconds, "profiled": args.profile,
                         "cuda_module_loading": os.environ.get(CUDA_MODULE_LOADING_ENV, "LAZY"),
                         "torch_cudnn_sdpa_avoid_recompile":
                             os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE"),
                         "profile_diff": diff if args.profile else None})
    print_table(rows, ["request", "prompt_tokens", "prefill_ms", "new_segments"])
    if args.profile:
        print("\n".join(diff_lines(diff)))


if __name__ == "__main__":
    main()
