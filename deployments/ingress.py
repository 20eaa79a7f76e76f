"""OpenAIIngress: the HTTP front door (FastAPI inside Serve) and the first-version router.

Life of a request here:
1. RECEIVED: auth (401), content type (415), body size while read (413), JSON (400, depth
   capped) and strict schema (400; unsupported fields named), model name (404).
2. Tokenize off the event loop (chat template for chat), validate ids and the length rule.
3. ADMITTED and ROUTED (``deployments/admission.py``): the routing policy plans the request
   from the replicas' reports and the ingress's own plans in flight -- "local" (decode
   prefills it) or "disaggregated" (decode reserves blocks and calls the planned prefill
   replica), and which replicas -- or refuses it at once: 429 + ``Retry-After`` when its
   queues are full, 503 when no replica of a role is alive. The response carries
   ``x-disagg-path``. An admitted request that outlives ``routing.request_timeout_s`` ends
   with a 504 error.
4. The first stream item decides the status: an error before any token is a proper HTTP
   error (400/503...); otherwise the response streams (SSE ending ``data: [DONE]``) or is
   returned whole. Stop strings and detokenization run here (``OutputProcessor``), for the
   prefill-sampled token 0 as for the rest; a stop string cancels the decode stream, which
   aborts the request there. A client that disconnects cancels it the same way.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.admission import Planner, Ticket, prefill_deployment
from deployments.config import AppConfig
from deployments.failures import REPLICA_GONE
from deployments.messages import StreamItem
from deployments.metrics import Metrics
from deployments.runtime import load_replica_model, local_proxy_url
from disagg.errors import DisaggError, InvalidRequestError
from disagg.openai.errors import (
    APIError,
    body_timeout,
    from_exception,
    from_http_status,
    invalid_request,
    too_large,
    unsupported_media_type,
)
from disagg.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    cap_max_tokens,
    decode_json_body,
)
from disagg.openai.responses import SSE_DONE, ResponseBuilder, sse
from disagg.output import OutputProcessor
from disagg.request import EngineRequest

app = FastAPI(title="disagg", docs_url=None, redoc_url=None)
logger = logging.getLogger("ray.serve")  # Serve writes it to this replica's log file
PATH_HEADER = "x-disagg-path"
WARMUP_HEADER = "x-disagg-warmup"  # the app's start-up token: the request is a warm-up
HTTP_WARMUP_REQUESTS = 4  # per ingress replica: Serve's proxy spreads them over the replicas
HTTP_WARMUP_BODY_BYTES = 128 << 10  # over Ray's 100 KiB inline limit, as a long prompt's body
HTTP_WARMUP_TIMEOUT_S = 120.0
_TOKEN_ID_BYTES = 8  # generous bytes per token id in a JSON list ("123456, ")


def error_response(error: APIError, path: str | None = None) -> JSONResponse:
    """``path``: the request's planned path (``none`` if the router refused it), if any."""
    headers = error.headers() if path is None else {**error.headers(), PATH_HEADER: path}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # One status for every invalid request: FastAPI's 422 becomes our 400.
    return error_response(invalid_request(f"invalid request: {error.errors()[0]['msg']}"))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown paths (404) and wrong methods (405) in the OpenAI shape, not {"detail": ...}.
    api_error = from_http_status(error.status_code, request.method, request.url.path)
    return JSONResponse(api_error.body(), status_code=api_error.status,
                        headers={**(error.headers or {}), **api_error.headers()})


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # A replica died, a bug: still the OpenAI error shape, and no internals in the message.
    return error_response(from_exception(error))


class _Reject(Exception):
    def __init__(self, error: APIError):
        self.error = error


async def next_item(stream, deadline: float | None = None) -> StreamItem:
    """The decode stream's next item; a decode replica that is gone (died, or the app is
    draining) becomes a 503 error item, before the first token as in mid-stream. Past
    ``deadline`` (``time.monotonic()``) the request is cancelled and ends with a 504 item."""
    try:
        if deadline is None:
            return await stream.__anext__()
        return await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        stream.cancel()
        return StreamItem(finished=True, finish_reason="error", error=APIError(
            504, "the request did not finish within the server's request timeout",
            "server_error", None, "timeout"))
    except REPLICA_GONE:
        return StreamItem(finished=True, finish_reason="error", error=APIError(
            503, "no decode replica could serve the request; retry", "server_error", None,
            "service_unavailable", retry_after_s=1))


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes while it is read: a
    chunked upload has no Content-Length to check first. A body still arriving after
    ``timeout_s`` is a 408 (a slow sender must not hold the request open)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Reject(too_large(limit))
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _Reject(too_large(limit))
                chunks.append(chunk)
    except TimeoutError:
        raise _Reject(body_timeout(timeout_s)) from None
    return b"".join(chunks)


async def _route_prefix(client: httpx.AsyncClient, app_name: str, timeout_s: float
                        ) -> str | None:
    """The route prefix of ``app_name`` in Serve's proxy (``GET /-/routes``), once listed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get("/-/routes")
        if r.status_code == 200 and isinstance(routes := r.json(), dict):
            for prefix, name in routes.items():
                if name == app_name:
                    return prefix
        await asyncio.sleep(0.2)
    return None


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    async def __init__(self, config: AppConfig, decode: DeploymentHandle, *,
                       warmup_token: str | None = None):
        loaded = load_replica_model(config, num_cpus=config.ingress.num_cpus, num_gpus=0,
                                    with_weights=False)
        self._config = config
        self._api_key = config.ingress.read_api_key()
        self._decode = decode
        self._tokenizer = loaded.tokenizer
        self._model_config = loaded.config
        self._context = loaded.config.max_context_tokens
        self._max_body_bytes = config.ingress.max_body_bytes or (
            self._context * _TOKEN_ID_BYTES + (1 << 20))
        self._metrics = Metrics()
        self._planner = Planner(config, loaded.config)
        # Ready only once the route to decode works: a handle's first call sets up its
        # router (seconds), which the first client request must not pay. The prefill pools'
        # routers here carry their replicas' reports to the planner (nothing is sent to them).
        await self._decode.stats.remote()
        app_name = serve.get_replica_context().app_name
        for pool in config.pools:
            await serve.get_deployment_handle(prefill_deployment(pool), app_name).stats.remote()
        # Start-up requests through Serve's HTTP proxy (see ``_warm_http_path``).
        self._warmup_token = warmup_token
        self._http_warmup = asyncio.get_running_loop().create_task(self._warm_http_path())

    async def _warm_http_path(self) -> list[int]:
        """Send ``HTTP_WARMUP_REQUESTS`` one-token completions through this node's Serve proxy
        and return their statuses. The proxy's first request into the app, its first calls
        with each ingress replica and its first object-store put of a body cost ~10 ms of a
        served request (RESULTS.md); none of that is reachable from inside the app. Sent when
        this constructor ends, these requests are held by the proxy until the first ingress
        replica runs and are answered right then, as a rule before ``serve.run`` sees the app
        ready (not a guarantee: a request that arrives sooner pays the rest). They carry the app's
        start-up token (one per app, made at build) and are always prefilled by decode, so
        no prefill replica counts them. Best effort: a failure is logged, nothing else."""
        if self._warmup_token is None:
            return []
        try:
            url = await asyncio.to_thread(local_proxy_url)
            if url is None:  # no proxy on this node: the first request pays it
                return []
            headers = {"content-type": "application/json", WARMUP_HEADER: self._warmup_token}
            if self._api_key is not None:
                headers["authorization"] = "Bearer " + self._api_key.decode()
            body = json.dumps({"model": self._config.model_name, "prompt": [0],
                               "max_tokens": 1, "temperature": 0}).encode()
            body += b" " * max(HTTP_WARMUP_BODY_BYTES - len(body), 0)  # JSON allows it
            app_name = serve.get_replica_context().app_name
            async with httpx.AsyncClient(base_url=url, timeout=HTTP_WARMUP_TIMEOUT_S) as client:
                prefix = await _route_prefix(client, app_name, HTTP_WARMUP_TIMEOUT_S)
                if prefix is None:
                    return []
                path = prefix.rstrip("/") + "/v1/completions"
                responses = await asyncio.gather(
                    *(client.post(path, content=body, headers=headers)
                      for _ in range(HTTP_WARMUP_REQUESTS)), return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - a warm-up: the first request pays instead
            logger.warning("OpenAIIngress: HTTP warm-up failed: %r", e)
            return []
        statuses = [r.status_code if isinstance(r, httpx.Response) else 0 for r in responses]
        logger.info("OpenAIIngress: HTTP warm-up through %s: statuses %s", url, statuses)
        return statuses

    async def http_warmup(self) -> list[int]:
        """This replica's start-up requests' HTTP statuses, once they are answered (tests)."""
        return await asyncio.shield(self._http_warmup)

    def _is_warmup(self, request: Request) -> bool:
        given = request.headers.get(WARMUP_HEADER)
        return (self._warmup_token is not None and given is not None
                and hmac.compare_digest(given.encode(), self._warmup_token.encode()))

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        if (error := self._check_auth(request)) is not None:
            return error_response(error)
        return JSONResponse({"object": "list", "data": [{
            "id": self._config.model_name, "object": "model", "created": 0,
            "owned_by": "disagg", "max_model_len": self._context}]})

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, ChatCompletionRequest, chat=True)

    def _check_auth(self, request: Request) -> APIError | None:
        given = request.headers.get("authorization", "")
        key = self._api_key  # constant-time comparison: no timing oracle on the key's bytes
        if key is None or hmac.compare_digest(given.encode(), b"Bearer " + key):
            return None
        return APIError(401, "missing or invalid API key", "invalid_request_error", None,
                        "invalid_api_key")

    async def _parse(self, request: Request, schema: type[BaseModel]):
        if (error := self._check_auth(request)) is not None:
            raise _Reject(error)
        if not _is_json(request.headers.get("content-type")):
            # Also what keeps a web page's form or text/plain post out (no CORS preflight).
            raise _Reject(unsupported_media_type(request.headers.get("content-type")))
        raw = await read_body(request, self._max_body_bytes,
                              self._config.ingress.body_read_timeout_s)
        try:
            body = schema.model_validate(decode_json_body(raw))
        except (ValidationError, InvalidRequestError) as e:
            raise _Reject(from_exception(e)) from e
        if body.model != self._config.model_name:
            raise _Reject(APIError(404, f"model {body.model!r} does not exist; this server "
                                        f"serves {self._config.model_name!r}",
                                   "invalid_request_error", "model", "model_not_found"))
        return body

    def _prompt_ids(self, body) -> list[int]:
        """Runs in a worker thread: long prompts must not block the event loop."""
        if isinstance(body, ChatCompletionRequest):
            if self._tokenizer is None:
                raise InvalidRequestError(f"model {self._config.model_name!r} has no tokenizer "
                                          "or chat template: use /v1/completions with token ids",
                                          param="messages")
            text = self._tokenizer.apply_chat_template(
                body.template_messages(), add_generation_prompt=True, tokenize=False)
            return self._tokenizer(text, add_special_tokens=False)["input_ids"]
        if isinstance(body.prompt, str):
            if self._tokenizer is None:
                raise InvalidRequestError(f"model {self._config.model_name!r} has random weights "
                                          "and no tokenizer: send the prompt as token ids",
                                          param="prompt")
            return self._tokenizer(body.prompt)["input_ids"]
        return list(body.prompt)

    async def _serve(self, http_request: Request, schema, *, chat: bool):
        t_start = time.perf_counter()
        try:
            body = await self._parse(http_request, schema)
            t_parsed = time.perf_counter()
            prompt_ids = await asyncio.to_thread(self._prompt_ids, body)
            params = cap_max_tokens(body.sampling_params(), self._config.ingress.max_tokens_limit,
                                    num_prompt_tokens=len(prompt_ids), context=self._context)
            request = EngineRequest.create(
                uuid.uuid4().hex, prompt_ids, params,
                vocab_size=self._model_config.vocab_size, context=self._context)
            processor = OutputProcessor(self._tokenizer, params)
        except _Reject as r:
            return error_response(r.error)
        except (DisaggError, ValidationError) as e:
            return error_response(from_exception(e))
        # admission: before any work is done
        ticket = self._planner.plan(request, local=self._is_warmup(http_request))
        if isinstance(ticket, APIError):
            self._metrics.requests.inc(tags={"path": "none", "status": str(ticket.status)})
            return error_response(ticket, "none")
        path = ticket.plan.path
        deadline = time.monotonic() + self._config.routing.request_timeout_s
        hops = {"ingress_received": t_start, "ingress_parsed": t_parsed,
                "ingress_sent": time.perf_counter()}
        try:
            stream = self._decode.options(stream=True).generate.remote(request, path,
                                                                       ticket.plan)
            first = await next_item(stream, deadline)
        except BaseException:
            ticket.end()
            raise
        ticket.first_token()
        if first.error is not None:
            ticket.end()
            stream.cancel()
            self._metrics.requests.inc(tags={"path": path, "status": str(first.error.status)})
            return error_response(first.error, path)
        builder = ResponseBuilder(chat=chat, model=self._config.model_name,
                                  num_prompt_tokens=request.num_prompt_tokens,
                                  tokenizer=self._tokenizer,
                                  want_logprobs=params.logprobs is not None)
        items = self._items(first, stream, processor, path, hops, builder, ticket, deadline)
        headers = {PATH_HEADER: path}
        if body.stream:
            return StreamingResponse(self._sse(items, builder, body.include_usage),
                                     media_type="text/event-stream", headers=headers)
        async with contextlib.aclosing(items):
            async for _, error in items:
                if error is not None:
                    return error_response(error)
        whole = builder.whole(processor.text, len(processor.token_ids), processor.logprobs,
                              processor.finish_reason)
        return JSONResponse(whole, headers=headers)

    async def _items(self, first: StreamItem, stream, processor: OutputProcessor, path: str,
                     hops: dict[str, float], builder: ResponseBuilder,
                     ticket: Ticket | None = None, deadline: float | None = None
                     ) -> AsyncIterator[tuple]:
        """(delta, error) pairs of the request; cancels the decode stream on an early exit.
        ``hops``: the ingress's own ``time.perf_counter()`` marks of the request, from
        ``ingress_received``; they join decode's wall-clock marks as wall-clock times."""
        t_start = hops["ingress_received"]
        item, status, t_first, t_first_wall = first, "200", None, 0.0
        try:
            while True:
                if item.error is not None:
                    status = str(item.error.status)
                if item.token is not None and t_first is None:
                    t_first, t_first_wall = time.perf_counter(), time.time()
                    self._metrics.ttft.observe(t_first - t_start)
                if item.timing is not None:
                    builder.timing = item.timing
                    if t_first is not None:  # the ingress's own hops join decode's marks
                        builder.timing.setdefault("marks", {}).update(
                            {name: t_first_wall - (t_first - t) for name, t in hops.items()},
                            ingress_token0=t_first_wall)
                delta = processor.push(item.token, item.finish_reason if item.finished else None)
                yield delta, item.error
                if processor.finished:
                    return
                item = await next_item(stream, deadline)
        finally:
            if ticket is not None:
                ticket.end()
            if not item.finished:  # a stop string, a disconnect: abort on the decode side
                stream.cancel()
            n = len(processor.token_ids)
            if t_first is not None and n > 1:
                self._metrics.tpot.observe((time.perf_counter() - t_first) / (n - 1))
            self._metrics.requests.inc(tags={"path": path, "status": status})

    async def _sse(self, items: AsyncIterator[tuple], builder: ResponseBuilder,
                   include_usage: bool):
        async for delta, error in items:
            if error is not None:  # failed mid-stream: the status line is long gone
                yield sse(error.body())
                break
            chunk = builder.chunk(delta)
            if chunk is not None:
                yield sse(chunk)
        if include_usage:
            yield sse(builder.usage_chunk())
        yield SSE_DONE
