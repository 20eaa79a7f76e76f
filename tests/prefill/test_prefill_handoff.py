"""The prefill side of the hand-off: each layer's KV goes to the writer as it is computed,
token 0 comes before any write is confirmed, cancellation stops at a layer boundary, and the
first reachable destination offered is the one written."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import random_model

from disagg.attention.prefill import PrefillCancelled
from disagg.disaggregated import FirstToken
from disagg.errors import KVTransferError
from disagg.kv.block_pool import BlockPool
from disagg.kv.layout import KVLayout
from disagg.kv.paged_cache import PagedKVCache
from disagg.prefill.engine import PrefillBusyError, PrefillEngine
from disagg.prefill.worker import run_prefill
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams
from disagg.transport.base import KVCompletion, KVDestination
from disagg.transport.direct import DirectKVReceiver, DirectKVSender


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama", seed=1)[0]


def make_request(rid="r1", n=50, max_tokens=8) -> EngineRequest:
    return EngineRequest.create(rid, list(range(10, 10 + n)),
                                SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                vocab_size=512, context=4096)


def destination_into_pool(model, request, block_size=4):
    """A decode pool with a fragmented reservation for ``request``, and its offer."""
    layout = KVLayout.of_model(model)
    cache = PagedKVCache(layout, 26, block_size)
    receiver = DirectKVReceiver()
    receiver.attach(cache)
    pool = BlockPool(26, block_size)  # 11 blocks at the end and a hole of 2
    pool.allocate(3)
    hole = pool.allocate(2)
    pool.allocate(10)
    pool.free(hole)  # the reservation below spans two runs
    table = pool.allocate(-(-(request.num_prompt_tokens + 1) // block_size))
    assert len(table.ranges) > 1
    runs = tuple(table.slot_runs(block_size, 0, request.num_prompt_tokens))
    offer = receiver.destination(request.request_id, runs, request.num_prompt_tokens, ttl_s=60)
    return cache, table, offer


def test_layers_written_in_place_are_bit_exact_with_the_packed_prefill(model):
    request = make_request()
    engine = PrefillEngine(model, model_name="tiny", senders=(DirectKVSender(),))
    cache, table, offer = destination_into_pool(model, request)
    writer = engine.open_writer((offer,))
    result = engine.prefill(request, writer)
    completion = writer.finish(_header(request, result))
    packed = engine.prefill(request).kv
    written = cache.read_packed(table, request.num_prompt_tokens)
    assert all(torch.equal(a, b) for a, b in zip(written.k + written.v, packed.k + packed.v))
    assert completion.num_layers == model.config.num_layers
    assert completion.num_bytes == packed.num_bytes and completion.backend == "inprocess"


class CountingSink:
    """Test sink that records the layers it got and cancels after ``cancel_after``."""

    def __init__(self, cancel_after: int):
        self.layers: list[int] = []
        self.cancel = threading.Event()
        self.cancel_after = cancel_after

    def write_layer(self, layer, k, v):
        self.layers.append(layer)
        if layer == self.cancel_after:
            self.cancel.set()


def test_cancellation_stops_the_prefill_at_the_next_layer(model):
    engine = PrefillEngine(model, model_name="tiny")
    sink = CountingSink(cancel_after=1)
    with pytest.raises(PrefillCancelled, match="layer 2"):
        engine.prefill(make_request(), sink, sink.cancel.is_set)
    assert sink.layers == [0, 1]


def test_the_first_reachable_offer_is_written(model):
    request = make_request()
    engine = PrefillEngine(model, model_name="tiny", senders=(DirectKVSender(),))
    _, _, offer = destination_into_pool(model, request)
    unreachable = KVDestination("r1", "cuda_ipc", "cuda_ipc:elsewhere", offer.runs,
                                offer.num_prompt_tokens, offer.expires_at)
    stale = KVDestination("r1", "inprocess", "inprocess:gone", offer.runs,
                          offer.num_prompt_tokens, offer.expires_at)
    assert engine.open_writer((unreachable, stale, offer)).destination is offer
    with pytest.raises(KVTransferError, match="none of the offered"):
        engine.open_writer((unreachable, stale))


class FakeLeasingSender(DirectKVSender):
    """Test fake: a sender whose published KV waits unpulled."""

    def leased(self):
        return 1, 10 << 30


def test_prefill_refuses_work_while_unpulled_kv_exceeds_its_budget(model):
    engine = PrefillEngine(model, model_name="tiny", senders=(FakeLeasingSender(),))
    with pytest.raises(PrefillBusyError, match="retry later"):
        engine.check_capacity()


class SlowWriter:
    """Test fake writer whose ``finish`` blocks until released (a transfer in flight)."""

    def __init__(self):
        self.release = threading.Event()
        self.aborted = threading.Event()
        self.layers = 0

    def write_layer(self, layer, k, v):
        self.layers += 1

    def finish(self, header):
        assert self.release.wait(30)
        return KVCompletion(header, "fake", 0, self.layers, 0.0)

    def abort(self):
        self.aborted.set()


class SlowEngine(PrefillEngine):
    """A real prefill engine whose writer is the slow fake above."""

    def __init__(self, model):
        super().__init__(model, model_name="tiny")
        self.writer = SlowWriter()

    def open_writer(self, offers):
        return self.writer


def test_token_0_arrives_while_the_kv_transfer_is_still_in_flight(model):
    engine = SlowEngine(model)

    async def main():
        events = run_prefill(engine, make_request(), (), eos_token_ids=(),
                             executor=ThreadPoolExecutor(1))
        first = await asyncio.wait_for(anext(events), 60)  # liveness, not speed
        assert isinstance(first, FirstToken) and first.finish_reason is None
        assert not engine.writer.release.is_set()  # the transfer has not completed
        engine.writer.release.set()
        completion = await asyncio.wait_for(anext(events), 60)
        assert completion.num_layers == model.config.num_layers
        with pytest.raises(StopAsyncIteration):
            await anext(events)

    asyncio.run(main())


def test_a_first_token_that_ends_the_request_aborts_the_writer(model):
    engine = SlowEngine(model)

    async def main():
        events = run_prefill(engine, make_request(max_tokens=1), (), eos_token_ids=(),
                             executor=ThreadPoolExecutor(1))
        first = await anext(events)
        assert first.finish_reason == "length"
        with pytest.raises(StopAsyncIteration):
            await anext(events)

    asyncio.run(main())
    assert engine.writer.aborted.is_set()


def test_closing_the_stream_mid_transfer_aborts_the_writer(model):
    engine = SlowEngine(model)

    async def main():
        events = run_prefill(engine, make_request(), (), eos_token_ids=(),
                             executor=ThreadPoolExecutor(1))
        await anext(events)
        engine.writer.release.set()  # let the finish thread end; the caller leaves anyway
        await events.aclose()

    asyncio.run(main())
    assert engine.writer.aborted.is_set()


def _header(request, result):
    from disagg.transport.base import KVHeader

    return KVHeader(request.request_id, result.fingerprint, result.first_token.token_id)
