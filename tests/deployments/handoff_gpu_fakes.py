"""Test fake for the GPU hand-off test: the real DecodeServer, recording a digest of each
disaggregated request's prompt KV as it sits in the pool once decoding has started."""

from __future__ import annotations

import hashlib

import torch

from deployments.decode_server import DecodeServer


def kv_digest(packed) -> str:
    h = hashlib.sha256()
    for t in (*packed.k, *packed.v):
        h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class KVDigestDecodeServer(DecodeServer.func_or_class):
    async def __init__(self, config, prefill):
        await super().__init__(config, prefill)
        self.last_digest = None

    async def _run_disaggregated(self, request):
        rid, n = request.request_id, request.num_prompt_tokens
        count = 0
        async for item in super()._run_disaggregated(request):
            count += 1
            if count == 2:  # token 1: the KV is in place and the request still holds it
                self.last_digest = await self._loop.call(
                    lambda e: kv_digest(e.cache.read_packed(e.block_table(rid), n)))
            yield item

    async def digest(self) -> str | None:
        return self.last_digest
