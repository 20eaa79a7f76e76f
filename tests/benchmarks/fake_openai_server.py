"""A fake OpenAI-compatible server for the load generator's error tests: an aiohttp app on a
thread of its own, answering each request by the first token id of its prompt."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

from aiohttp import web

OK, RATE_LIMITED, SERVER_ERROR, BAD_REQUEST, STREAM_ERROR, CUT = range(6)


def _sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _chunk(text: str) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text,
                                                      "finish_reason": None}]}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "x", "param": None,
                                        "code": None}}, status=status,
                             headers={"Retry-After": "1"} if status == 429 else None)


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    kind = body["prompt"][0] % 6
    if kind == RATE_LIMITED:
        return _error(429, "slow down")
    if kind == SERVER_ERROR:
        return _error(500, "boom")
    if kind == BAD_REQUEST:
        return _error(400, "bad")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_sse(_chunk("a")))
    if kind == STREAM_ERROR:
        await resp.write(_sse({"error": {"message": "died mid-stream"}}))
        await resp.write(_sse("[DONE]"))
        return resp
    if kind == CUT:
        request.transport.close()  # the connection drops mid-stream
        return resp
    for text in ("b", "c"):
        await asyncio.sleep(0.005)
        await resp.write(_sse(_chunk(text)))
    await resp.write(_sse({"object": "text_completion", "choices": [],
                           "usage": {"prompt_tokens": len(body["prompt"]),
                                     "completion_tokens": 3, "total_tokens": 0}}))
    await resp.write(_sse("[DONE]"))
    return resp


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})


class FakeErrorServer:
    """``with FakeErrorServer() as url:`` serves until the block ends."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner = None

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", _completions)
        app.router.add_get("/v1/models", _models)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> str:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
