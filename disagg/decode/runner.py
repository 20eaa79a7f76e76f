"""The decode model runner: one forward for a scheduled batch, then sampling.

Life of one batch here:
1. Order the sequences decode rows first (``PagedAttention``'s layout), flatten their new
   tokens into ``input_ids``/``positions``, and build the attention metadata.
2. One model forward (``num_forwards`` counts them); logits only for the rows that end a
   sequence's known tokens.
3. Sample each of those rows with the request's seed and generated-token index, so a token
   does not depend on the batch it was computed in, nor on which worker sampled it.
"""

from __future__ import annotations

import torch

from disagg.attention.paged import PagedAttention, SequenceSlice
from disagg.decode.scheduler import SchedulerOutput
from disagg.kv.paged_cache import PagedKVCache
from disagg.models.llama import LlamaForCausalLM
from disagg.sampling import SampledToken, sample


class ModelRunner:
    """Runs the model over the paged cache."""

    def __init__(self, model: LlamaForCausalLM, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.num_forwards = 0

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput) -> dict[str, SampledToken]:
        """Forward ``batch`` once; return the sampled token of every sequence that got one."""
        sequences = sorted(batch.sequences, key=lambda s: len(s.token_ids) > 1)
        input_ids = torch.tensor([t for s in sequences for t in s.token_ids],
                                 dtype=torch.long, device=self.device)
        positions = torch.cat([
            torch.arange(s.num_computed_tokens, s.num_computed_tokens + len(s.token_ids),
                         device=self.device) for s in sequences])
        metadata = PagedAttention.build(self.cache, self.model.scale, [
            SequenceSlice(s.num_computed_tokens, len(s.token_ids), s.block_table)
            for s in sequences])
        hidden = self.model(input_ids, positions, metadata)
        self.num_forwards += 1
        last_rows = torch.tensor([len(s.token_ids) for s in sequences]).cumsum(0) - 1
        to_sample = [i for i, s in enumerate(sequences) if s.sample_step is not None]
        if not to_sample:
            return {}
        logits = self.model.compute_logits(hidden[last_rows[to_sample].to(self.device)])
        return {sequences[i].request_id: sample(row, sequences[i].params, sequences[i].seed,
                                                sequences[i].sample_step)
                for i, row in zip(to_sample, logits)}
