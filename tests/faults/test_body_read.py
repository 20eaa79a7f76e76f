"""The ingress reads a body under two bounds: size (413 as soon as it passes the limit, with
or without Content-Length) and time (408 for a body still arriving at its deadline)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from deployments.ingress import _Reject, read_body


def _request(chunks: list[bytes], *, stall: bool = False, length: int | None = None):
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    sent = iter(chunks)

    async def receive():
        chunk = next(sent, None)
        if chunk is None:
            if stall:  # a client that stops sending mid-body
                await asyncio.Event().wait()
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    return Request(scope, receive)


def _read(request, limit=1000, timeout_s=5.0):
    return asyncio.run(read_body(request, limit, timeout_s))


def test_a_body_within_its_bounds_is_read_whole():
    assert _read(_request([b'{"a":', b" 1}"])) == b'{"a": 1}'


@pytest.mark.parametrize("length", [None, 400])
def test_a_body_over_the_limit_is_413_while_read(length):
    with pytest.raises(_Reject) as info:  # 400 bytes declared, 2,000 sent: counted anyway
        _read(_request([b"x" * 500] * 4, length=length))
    assert info.value.error.status == 413


def test_a_declared_length_over_the_limit_is_413_before_reading():
    with pytest.raises(_Reject) as info:
        _read(_request([], stall=True, length=5000))
    assert info.value.error.status == 413


def test_a_stalled_body_is_408_at_its_deadline():
    with pytest.raises(_Reject) as info:
        _read(_request([b'{"model": '], stall=True), timeout_s=0.2)
    error = info.value.error
    assert (error.status, error.code) == (408, "request_timeout")
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
