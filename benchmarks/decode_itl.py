"""Decode ITL on one GPU: the decode engine's step (paged kernel, CUDA graphs, device sampler)
against transformers' static-cache decode under ``torch.compile(mode="reduce-overhead")``.

    python -m benchmarks.decode_itl [--cases 1x4096 8x4096 32x4096 64x4096 1x32768 1x131072]
        [--steps 32] [--warmup 4] [--transformers-batches 1 32] [--sweep]

Random weights of Llama-3.1-8B, bf16, token ids (seed 0). One ``DecodeEngine`` for all cases,
warmed up (kernels compiled, graphs captured) before anything is timed. Two measurements:
- ``itl_ms``: the engine as served. ``batch`` requests of ``context - 1`` random prompt tokens
  (fewer where that and the generated tokens would pass the model's context) go through
  ``add_request`` (the engine prefills them itself, untimed) and ``DecodeEngine.step`` runs
  until they end, greedy, with its default ``async_scheduling`` (each step's forward queued
  before the previous one's tokens are read). ITL = the median time between consecutive
  steps that report a token of the first request while every request decodes (after the last
  prefill, before the first end), the first ``--warmup`` intervals dropped.
- ``sync_step_ms``: one step at a time on the runner. The KV pool is filled with random rows
  directly; each step hands ``ModelRunner.execute`` the batch the scheduler would (one new token
  per sequence at position ``context - 1`` onward, the token sampled last step fed back) and
  waits for its tokens: graph replay + sampling + the host's staging, not overlapped.
``gpu_ms`` is a replay of the step's graph alone (no staging, no sampling).

Bytes per step: every weight matrix once (the embedding table contributes only ``batch`` rows)
plus the K/V each sequence attends over; ``achieved_gbps`` = bytes / ``itl_ms``.
transformers (same weights, SDPA): one eager prefill of ``context`` tokens per sequence into a
``StaticCache``, then compiled one-token steps, timed after warm-up. ``--sweep`` times the
attention kernel alone over tile configs and split counts (``decode_kernel_sweep.json``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from disagg_kernels.paged_decode.configs import DecodeTileConfig, pick_config, pick_num_splits
from disagg_kernels.paged_decode.launcher import paged_decode_attention_triton

from benchmarks.common import (
    RESULTS_DIR,
    add_provenance_args,
    print_table,
    unshared_state_dict,
    write_results,
)
from disagg.decode.config import DecodeConfig
from disagg.decode.engine import DecodeEngine
from disagg.decode.scheduler import ScheduledSequence, SchedulerOutput
from disagg.kv.block_pool import blocks_for
from disagg.models.loader import ModelSource, load_model
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

BLOCK_SIZE = 16
MODEL = "llama-3.1-8b"
COLUMNS = ["batch", "context_tokens", "itl_ms", "sync_step_ms", "gpu_ms", "achieved_gbps",
           "transformers_itl_ms", "speedup"]
SWEEP_CONFIGS = [DecodeTileConfig(32, 4, 2), DecodeTileConfig(64, 4, 2),
                 DecodeTileConfig(64, 4, 3), DecodeTileConfig(128, 4, 2),
                 DecodeTileConfig(64, 8, 2), DecodeTileConfig(128, 8, 3)]


def weight_bytes_read(model, batch: int) -> int:
    """Bytes of the weights one step reads: all matrices and norms, ``batch`` embedding rows."""
    embed = model.model.embed_tokens.weight
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    if model.lm_head.weight is not embed:
        total -= embed.numel() * embed.element_size()
        total += batch * embed.shape[1] * embed.element_size()
    return total


def parse_case(text: str) -> tuple[int, int]:
    batch, context = text.lower().split("x")
    return int(batch), int(context)


class EngineBench:
    """The engine of every case, its pool filled with random K/V."""

    def __init__(self, model, cases, steps: int):
        need = max(b * blocks_for(ctx + steps + b + 2, BLOCK_SIZE) for b, ctx in cases)
        config = DecodeConfig(block_size=BLOCK_SIZE, num_blocks=need,
                              max_num_seqs=max(64, *(b for b, _ in cases)),
                              max_num_batched_tokens=4096)
        self.model = model
        self.engine = DecodeEngine(model, config, model_name=f"random:{MODEL}")
        t0 = time.perf_counter()
        self.warm_up_error = None
        try:
            self.engine.warm_up()
        except Exception as e:  # noqa: BLE001 (recorded: the steps then run eagerly)
            self.warm_up_error = repr(e)
            print(f"WARM-UP FAILED, decode runs eagerly: {e!r}", flush=True)
        torch.cuda.synchronize()
        self.warm_up_s = time.perf_counter() - t0
        g = torch.Generator(device="cuda").manual_seed(0)
        for t in (*self.engine.cache.k, *self.engine.cache.v):
            t.normal_(generator=g)

    def run(self, batch: int, context: int, steps: int, warmup: int) -> dict:
        engine, runner = self.engine, self.engine.runner
        tables = [engine.pool.allocate(blocks_for(context + steps + warmup + 1, BLOCK_SIZE))
                  for _ in range(batch)]
        params = SamplingParams(temperature=0.0, ignore_eos=True)
        tokens = [(7 * b) % self.model.config.vocab_size for b in range(batch)]
        step_s = []
        try:
            for step in range(warmup + steps):
                computed = context - 1 + step  # the new token's position; context keys at step 0
                seqs = tuple(ScheduledSequence(f"r{b}", (tokens[b],), computed, tables[b], step,
                                               params, b) for b in range(batch))
                t0 = time.perf_counter()
                sampled = runner.execute(SchedulerOutput(seqs))
                if step >= warmup:
                    step_s.append(time.perf_counter() - t0)
                tokens = [sampled[f"r{b}"].token_id for b in range(batch)]
            gpu_ms = self._replay_ms(batch)
        finally:
            for t in tables:
                engine.pool.free(t)
        itl_s = statistics.median(step_s)
        return {"batch": batch, "context_tokens": context, "sync_step_ms": itl_s * 1e3,
                "sync_step_mean_ms": statistics.fmean(step_s) * 1e3, "gpu_ms": gpu_ms,
                "num_splits": pick_num_splits(runner.graphs.padded_size(batch),
                                              engine.layout.num_kv_heads,
                                              engine.cache.device)}

    def run_engine(self, batch: int, context: int, steps: int, warmup: int) -> dict:
        """ITL of the engine's own step loop (module docstring), as served: the intervals
        between steps reporting a token of the first request while every request decodes
        (after the last prefill, before the first end), the first ``warmup`` dropped."""
        engine = self.engine
        vocab, limit = self.model.config.vocab_size, self.model.config.max_context_tokens
        # The first request decodes while the others prefill (one per step): ``batch`` more
        # tokens, so that every request still decodes ``warmup + steps`` tokens together.
        max_tokens = warmup + steps + batch + 2
        prompt = min(context - 1, limit - max_tokens)
        g = torch.Generator().manual_seed(batch * 7 + context)
        for b in range(batch):
            engine.add_request(EngineRequest.create(
                f"e{b}", torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                vocab_size=vocab, context=limit))
        overlapped0, times, started, ended = engine.num_overlapped_steps, [], set(), False
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            started.update(o.request_id for o in outputs if o.token is not None)
            ended = ended or any(o.finished for o in outputs)
            if len(started) == batch and not ended and any(
                    o.request_id == "e0" and o.token is not None for o in outputs):
                times.append(now)
        torch.cuda.synchronize()
        intervals = [b - a for a, b in itertools.pairwise(times)][warmup:]
        itl_s = statistics.median(intervals)
        kv = batch * (context + warmup + steps / 2) * engine.layout.bytes_per_token
        moved = weight_bytes_read(self.model, batch) + kv
        return {"itl_ms": itl_s * 1e3, "itl_mean_ms": statistics.fmean(intervals) * 1e3,
                "itl_intervals": len(intervals), "engine_prompt_tokens": prompt,
                "itl_p90_ms": statistics.quantiles(intervals, n=10)[-1] * 1e3,
                "achieved_gbps": moved / itl_s / 1e9, "bytes_per_step": int(moved),
                "overlapped_steps": engine.num_overlapped_steps - overlapped0,
                "async_scheduling": engine.async_scheduling}

    def profile(self, batch: int, context: int, steps: int = 5) -> dict:
        """A torch-profiler trace of ``steps`` steps of the case: the CUDA kernels by total
        time per step and the host-side ops by self CPU time per step (where a step's time
        goes when ITL is above the graph's GPU time)."""
        from torch.profiler import ProfilerActivity, profile

        engine, runner = self.engine, self.engine.runner
        tables = [engine.pool.allocate(blocks_for(context + steps + 2, BLOCK_SIZE))
                  for _ in range(batch)]
        params = SamplingParams(temperature=0.0, ignore_eos=True)
        try:
            def step(i):
                seqs = tuple(ScheduledSequence(f"r{b}", (7 * b,), context - 1 + i, tables[b], i,
                                               params, b) for b in range(batch))
                runner.execute(SchedulerOutput(seqs))
            for i in range(2):
                step(i)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(steps):
                    step(2 + i)
        finally:
            for t in tables:
                engine.pool.free(t)
        events = prof.key_averages()

        def top(key, n=25):
            rows = sorted(events, key=key, reverse=True)[:n]
            return [{"name": e.key[:120], "calls_per_step": e.count / steps,
                     "cuda_us_per_step": e.device_time_total / steps,
                     "self_cpu_us_per_step": e.self_cpu_time_total / steps} for e in rows]
        return {"batch": batch, "context_tokens": context, "steps": steps,
                "cuda_kernels": top(lambda e: e.device_time_total if e.device_type.name == "CUDA"
                                    or "kernel" in e.key.lower() else 0),
                "host_ops": top(lambda e: e.self_cpu_time_total)}

    def _replay_ms(self, batch: int, repeats: int = 10) -> float:
        """The last step's graph replayed alone (its inputs still staged)."""
        graphs = self.engine.runner.graphs
        size = graphs.padded_size(batch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graphs.run(size)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    def sweep(self, cases) -> list[dict]:
        """The attention kernel alone on layer 0's cache: tile configs x split counts."""
        import triton

        cache, layout = self.engine.cache, self.engine.layout
        rows = []
        for batch, context in cases:
            tables = [self.engine.pool.allocate(blocks_for(context, BLOCK_SIZE))
                      for _ in range(batch)]
            try:
                width = max(t.num_blocks for t in tables)
                bt = torch.zeros(batch, width, dtype=torch.int32)
                for b, t in enumerate(tables):
                    bt[b, :t.num_blocks] = torch.tensor(t.block_ids, dtype=torch.int32)
                bt = bt.cuda()
                lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
                q = torch.randn(batch, self.model.config.num_heads, layout.head_dim,
                                device="cuda", dtype=torch.bfloat16)
                base = pick_num_splits(batch, layout.num_kv_heads, cache.device)
                kv_bytes = batch * context * layout.num_kv_heads * layout.head_dim * 2 * 2
                for cfg in SWEEP_CONFIGS:
                    fewer = (s for s in (4, 8, 16) if s < base)  # short contexts, small batches
                    for splits in sorted({max(1, base // 2), base, min(64, base * 2), *fewer}):
                        ms = triton.testing.do_bench(functools.partial(
                            paged_decode_attention_triton, q, cache.k[0], cache.v[0], bt, lens,
                            block_size=BLOCK_SIZE, num_splits=splits, config=cfg))
                        rows.append({"batch": batch, "context_tokens": context,
                                     "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                                     "num_stages": cfg.num_stages, "num_splits": splits,
                                     "is_default": splits == base and cfg == pick_config(
                                         cache.device, batch, layout.num_kv_heads),
                                     "kernel_us": ms * 1e3,
                                     "kernel_gbps": kv_bytes / ms / 1e6})
            finally:
                for t in tables:
                    self.engine.pool.free(t)
        return rows


def build_transformers(model):
    """transformers' Llama with SDPA holding ``model``'s weight tensors (its own copies of the
    packed ones: ``unshared_state_dict``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = ModelSource(name=MODEL, random_config=MODEL, seed=0)
    config = AutoConfig.for_model(**source.hf_config())
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                              dtype=torch.bfloat16)
    state, copied = unshared_state_dict(model)
    hf.load_state_dict(state, assign=True, strict=True)
    hf.copied_weight_bytes = copied
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to("cuda")  # a meta buffer
    return hf.eval()


@torch.inference_mode()
def transformers_itl_ms(hf, batch: int, context: int, steps: int, warmup: int) -> float:
    from transformers import StaticCache

    cache = StaticCache(config=hf.config, max_cache_len=context + steps + warmup + 8)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), device="cuda", generator=g)
    out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    del out
    decode = torch.compile(hf.forward, mode="reduce-overhead")
    step_s = []
    for step in range(warmup + steps):
        pos = torch.tensor([context + step], device="cuda")
        t0 = time.perf_counter()
        out = decode(input_ids=token, past_key_values=cache, cache_position=pos,
                     position_ids=pos[None].expand(batch, 1), use_cache=True)
        token = out.logits[:, -1:].argmax(-1).clone()
        torch.cuda.synchronize()
        if step >= warmup:
            step_s.append(time.perf_counter() - t0)
    return statistics.median(step_s) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["1x4096", "8x4096", "32x4096",
                                                       "64x4096", "1x32768", "1x131072"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--transformers-batches", type=int, nargs="*", default=[1, 32],
                        help="batches at 4K context timed with transformers (none: skip)")
    parser.add_argument("--transformers-warmup", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=1e9,
                        help="skip transformers batches that would start after this many s")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="also write a profiler summary of batch-1 4K steps here")
    parser.add_argument("--sweep-cases", nargs="+", default=["1x131072", "32x4096"])
    parser.add_argument("--sweep-out", type=Path, default=RESULTS_DIR / "decode_kernel_sweep.json")
    add_provenance_args(parser)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cases = [parse_case(c) for c in args.cases]
    model = load_model(ModelSource(name=MODEL, random_config=MODEL, seed=0), device="cuda",
                       dtype=torch.bfloat16)
    bench = EngineBench(model, cases, args.steps + args.warmup)
    extra = {"model": f"random:{MODEL}", "dtype": "bfloat16", "block_size": BLOCK_SIZE,
             "warm_up_s": bench.warm_up_s, "warm_up_error": bench.warm_up_error,
             "captured_batch_sizes": list(bench.engine.runner.graphs.captured_sizes)}

    def save(rows):
        path = write_results("decode_itl", rows, commit=args.commit, dirty=args.dirty,
                             out=args.out, extra=extra)
        print(f"wrote {path}", flush=True)

    rows = []
    for batch, context in cases:
        rows.append(bench.run(batch, context, args.steps, args.warmup))
        rows[-1].update(bench.run_engine(batch, context, args.steps, args.warmup))
        rows[-1]["transformers_itl_ms"] = None
        print(rows[-1], flush=True)
        save(rows)
    if args.profile_out:
        args.profile_out.write_text(json.dumps(bench.profile(1, 4096), indent=1))
        print(f"wrote {args.profile_out}", flush=True)
    if args.sweep:
        sweep = bench.sweep([parse_case(c) for c in args.sweep_cases])
        write_results("decode_kernel_sweep", sweep, commit=args.commit, dirty=args.dirty,
                      out=args.sweep_out, extra={"model": f"random:{MODEL}"})
        print_table(sweep, ["batch", "context_tokens", "block_n", "num_warps", "num_stages",
                            "num_splits", "is_default", "kernel_us", "kernel_gbps"])
    del bench
    torch.cuda.empty_cache()
    if args.transformers_batches:
        hf = build_transformers(model)
        for batch in args.transformers_batches:
            if time.perf_counter() - started > args.budget_s:
                print(f"transformers batch {batch}: skipped (budget)", flush=True)
                continue
            ms = transformers_itl_ms(hf, batch, 4096, args.steps, args.transformers_warmup)
            for row in rows:
                if (row["batch"], row["context_tokens"]) == (batch, 4096):
                    row["transformers_itl_ms"] = ms
                    row["speedup"] = ms / row["itl_ms"]
            print(f"transformers batch {batch} at 4096: {ms:.2f} ms", flush=True)
            save(rows)
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
