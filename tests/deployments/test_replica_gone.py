"""When no replica of the next deployment can take a call (replicas died, or the app drains).

Decode prefills the request itself when prefill is gone; the ingress answers 503 when decode is
gone. The DecodeServer class runs here without Serve (constructed the way Serve constructs it),
with fakes of the handles that fail as Serve's handles fail when no replica can serve.
"""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import DeploymentUnavailableError

from deployments.config import AppConfig
from deployments.decode_server import DISAGGREGATED, LOCAL, DecodeServer
from deployments.ingress import next_item
from deployments.messages import DecodeStats, StreamItem
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

PROMPT = tuple(range(5, 45))


class _FakeMethod:
    def __init__(self, result=None, error: Exception | None = None):
        self.result, self.error, self.calls = result, error, 0

    def remote(self, *args):
        self.calls += 1

        async def reply():
            if self.error is not None:
                raise self.error
            return self.result

        return reply()


class _FakeGoneStream:
    """A streaming call whose replica is gone: its first item raises."""

    def __init__(self, error: Exception):
        self._error = error

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise self._error

    def cancel(self):
        pass


class _FakeStreamingMethod:
    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def remote(self, *args):
        self.calls += 1
        return _FakeGoneStream(self.error)


class FakeGonePrefillHandle:
    """Test fake of the prefill DeploymentHandle: set up fine, then every prefill call fails."""

    def __init__(self, error: Exception):
        self.stats = _FakeMethod(result=None)
        self.prefill = _FakeStreamingMethod(error)

    def options(self, **kwargs):
        return self


async def _server(prefill) -> DecodeServer:
    cls = DecodeServer.func_or_class
    server = cls.__new__(cls)  # Serve awaits an async __init__ the same way
    await cls.__init__(server, AppConfig(model="random:tiny-llama", local_prefill_max_tokens=8),
                       prefill)
    return server


async def _tokens(server: DecodeServer, request_id: str, path: str) -> list[int]:
    request = EngineRequest(request_id, PROMPT, SamplingParams(temperature=0.0), 12, 0)
    items = [item async for item in server.generate(request, path)]
    assert all(item.error is None for item in items), items
    assert items[-1].finished and items[-1].finish_reason == "length"
    return [item.token.token_id for item in items]


@pytest.mark.parametrize("error", [DeploymentUnavailableError("PrefillServer"),
                                   ActorDiedError()], ids=["deleted", "died"])
def test_disaggregated_request_is_prefilled_here_when_prefill_is_gone(error):
    async def run():
        prefill = FakeGonePrefillHandle(error)
        server = await _server(prefill)  # ready although its start-up request failed
        try:
            assert prefill.prefill.calls == 1  # the start-up request through prefill
            baseline: DecodeStats = await server.stats()
            fallback = await _tokens(server, "r-fallback", DISAGGREGATED)
            assert prefill.prefill.calls == 2  # it did try prefill first
            local = await _tokens(server, "r-local", LOCAL)
            assert fallback == local  # greedy: the same tokens as the local path
            after = await server.stats()
            assert after.num_free_blocks == baseline.num_free_blocks  # reservation released
            assert not after.has_unfinished
        finally:
            server.__del__()

    asyncio.run(run())


class FakeDecodeStream:
    """Test fake of a decode replica's token stream: some items, then the replica is gone."""

    def __init__(self, items: list[StreamItem], error: Exception):
        self._items, self._error = list(items), error

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamItem:
        if self._items:
            return self._items.pop(0)
        raise self._error


@pytest.mark.parametrize("error", [DeploymentUnavailableError("DecodeServer"),
                                   ActorDiedError()], ids=["deleted", "died"])
def test_ingress_turns_a_gone_decode_replica_into_503(error):
    async def run():
        ok = StreamItem(finished=False)
        stream = FakeDecodeStream([ok], error)
        assert await next_item(stream) is ok  # items pass through untouched
        gone = await next_item(stream)  # mid-stream, or as the first item
        assert gone.finished and gone.finish_reason == "error" and gone.token is None
        assert gone.error.status == 503
        assert gone.error.headers() == {"Retry-After": "1"}
        assert gone.error.body()["error"]["code"] == "service_unavailable"

    asyncio.run(run())
