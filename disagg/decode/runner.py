"""The decode model runner: one forward for a scheduled batch, then sampling.

Life of one batch here:
1. Order the sequences decode rows first (``PagedAttention``'s layout).
2. Pure decode on CUDA (every sequence has one new token, at most ``max_num_seqs``): stage the
   rows into persistent buffers padded to a captured size and replay its CUDA graph
   (``cuda_graphs.py``): no tensor is built from Python lists and nothing waits for the device.
   Anything else (local-prefill chunks in the batch, or the CPU): flatten the new tokens,
   build the metadata with ``PagedAttention.build`` and run the model eagerly.
3. Logits only for the rows that end a sequence's known tokens; every such row is sampled on
   the device with the request's seed and generated-token index (``sampler.py``), so a token
   does not depend on the batch it was computed in, nor on which worker sampled it. The batch's
   tokens come back in one device-to-host transfer.
``execute`` does all of it and waits; ``launch`` queues it and returns a ``PendingForward``
that ``land`` reads later, so the engine can queue the next decode step first. That step's
token ids are placeholders taken on the device from the pending forward's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.attention.dense_backends import tune_causal
from disagg.attention.paged import PagedAttention, PrefillSegment, SequenceSlice
from disagg.decode.cuda_graphs import DecodeGraphs, DecodeInputs, graph_batch_sizes
from disagg.decode.sampler import PendingSample, RowRequest, Sampler
from disagg.decode.scheduler import PLACEHOLDER_TOKEN, ScheduledSequence, SchedulerOutput
from disagg.kv.paged_cache import PagedKVCache
from disagg.models.llama import LlamaForCausalLM
from disagg.sampling import SampledToken


@dataclass(frozen=True)
class PendingForward:
    """A forward queued on the device whose sampled tokens the host has not read yet."""

    batch: SchedulerOutput
    sampled: tuple[ScheduledSequence, ...]  # the sequences that sample, in row order
    sample: PendingSample | None  # None: nothing to sample
    fence: int = 0  # the block pool's fence of this forward (``DecodeEngine``)


def _placeholder_sources(sequences: list[ScheduledSequence],
                         previous: PendingForward | None) -> list[int] | None:
    """Per row, the row of ``previous``'s sampled tokens its placeholder token comes from;
    None when no row has a placeholder."""
    marked = [s.token_ids == (PLACEHOLDER_TOKEN,) for s in sequences]
    if not any(marked):
        return None
    if not all(marked) or previous is None or previous.sample is None:
        raise ValueError("placeholder tokens need every row to be one, and the previous "
                         "forward's samples")
    rows = {s.request_id: i for i, s in enumerate(previous.sampled)}
    try:
        return [rows[s.request_id] for s in sequences]
    except KeyError as e:
        raise ValueError(f"placeholder token of {e.args[0]!r}: not sampled by the previous "
                         "forward") from None


class ModelRunner:
    """Runs the model over the paged cache."""

    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache, *,
                 max_num_seqs: int = 64):
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.num_forwards = 0
        self.max_num_seqs = max_num_seqs
        self.sampler = Sampler(max(max_num_seqs, 1), self.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda":
            inputs = DecodeInputs(cache, max_num_seqs)
            self.graphs = DecodeGraphs(model, inputs, graph_batch_sizes(max_num_seqs))

    def warm_up(self, max_prompt_chunk: int) -> None:
        """Compile every kernel a step runs, pick the dense kernel of a prompt's first chunk
        (every layer's causal square, up to ``max_prompt_chunk`` tokens) by measurement, and
        capture the CUDA graphs of every decode batch size (CUDA; nothing to do on CPU).
        Without it pure-decode steps run the same forward eagerly and the first step of each
        shape pays the compilation, and every local prompt cuDNN's plan for its length."""
        if self.graphs is None:
            return
        config = self.model.config
        tune_causal(self.device, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                    head_dim=config.head_dim, dtype=self.cache.layout.dtype,
                    max_tokens=max_prompt_chunk, calls_per_prompt=config.num_layers)
        # Mixed batches run eagerly: both specializations of the store kernel's token count
        # (multiple of 16 or not), decode rows and a fresh prompt segment.
        for num_tokens in (15, 16):
            self.dry_forward(1, num_tokens)
        self.graphs.capture()

    @torch.inference_mode()
    def dry_forward(self, num_decode: int, num_prompt_tokens: int) -> torch.Tensor:
        """A mixed forward that stores and reads no KV (every slot -1, every decode row of
        length 0): ``num_decode`` decode rows then one fresh prompt. Returns its last row's
        logits ``[1, V]``."""
        device, total = self.device, num_decode + num_prompt_tokens
        metadata = PagedAttention(
            self.cache, self.model.scale,
            torch.full((total,), -1, dtype=torch.long, device=device), num_decode,
            torch.zeros(num_decode, 1, dtype=torch.int32, device=device),
            torch.zeros(num_decode, dtype=torch.int32, device=device),
            (PrefillSegment(num_decode, num_prompt_tokens, 0, None),))
        positions = torch.cat([torch.zeros(num_decode, dtype=torch.long, device=device),
                               torch.arange(num_prompt_tokens, device=device)])
        hidden = self.model(torch.zeros(total, dtype=torch.long, device=device), positions,
                            metadata)
        return self.model.compute_logits(hidden[-1:])

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> dict[str, SampledToken]:
        """Forward ``batch`` once; return the sampled token of every sequence that got one."""
        return self.land(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: SchedulerOutput, previous: PendingForward | None = None
               ) -> PendingForward:
        """Queue ``batch``'s forward and sampling on the device; wait for nothing. Sequences
        whose token is ``PLACEHOLDER_TOKEN`` take it on the device from ``previous`` (the
        forward launched just before, not yet landed) — every row of such a batch must."""
        to_sample, logits = self.forward_logits(batch, previous)
        if not to_sample:
            return PendingForward(batch, (), None)
        sample = self.sampler.launch(logits, [RowRequest(s.params, s.seed, s.sample_step)
                                              for s in to_sample])
        return PendingForward(batch, tuple(to_sample), sample)

    def land(self, pending: PendingForward) -> dict[str, SampledToken]:
        """The sampled tokens of a launched forward, by request id (waits for them)."""
        if pending.sample is None:
            return {}
        tokens = self.sampler.read(pending.sample)
        return {s.request_id: t for s, t in zip(pending.sampled, tokens)}

    @torch.inference_mode()
    def forward_logits(self, batch: SchedulerOutput, previous: PendingForward | None = None
                       ) -> tuple[list[ScheduledSequence], torch.Tensor]:
        """One forward: the sequences that sample, and fp32 logits ``[R, V]`` whose first rows
        are theirs, in that order (rows past them are padding)."""
        sequences = sorted(batch.sequences, key=lambda s: len(s.token_ids) > 1)
        sampled = [i for i, s in enumerate(sequences) if s.sample_step is not None]
        sources = _placeholder_sources(sequences, previous)
        self.num_forwards += 1
        padded = self.graphs.padded_size(len(sequences)) if self.graphs else None
        if padded is not None and all(len(s.token_ids) == 1 for s in sequences):
            inputs = self.graphs.inputs
            inputs.stage(sequences, padded, sources)
            if sources is not None:
                inputs.take_tokens(len(sequences), previous.sample.token_ids)
            logits = self.graphs.run(padded)
            if len(sampled) < len(sequences):  # a one-token prompt chunk that ends mid-prompt
                logits = logits[torch.tensor(sampled, device=self.device)]
        else:
            logits = self._eager_logits(sequences, sampled, sources, previous)
        return [sequences[i] for i in sampled], logits

    def _eager_logits(self, sequences: list[ScheduledSequence], sampled: list[int],
                      sources: list[int] | None, previous: PendingForward | None
                      ) -> torch.Tensor:
        input_ids = torch.tensor([t for s in sequences for t in s.token_ids],
                                 dtype=torch.long, device=self.device)
        if sources is not None:  # one token per row: row i is input i
            input_ids = previous.sample.token_ids[torch.tensor(sources, device=self.device)]
        positions = torch.cat([
            torch.arange(s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids),
                         device=self.device) for s in sequences])
        metadata = PagedAttention.build(self.cache, self.model.scale, [
            SequenceSlice(s.num_computed_tokens, len(s.token_ids), s.block_table)
            for s in sequences])
        hidden = self.model(input_ids, positions, metadata)
        last_rows = torch.tensor([len(s.token_ids) for s in sequences]).cumsum(0) - 1
        return self.model.compute_logits(hidden[last_rows[sampled].to(self.device)])
