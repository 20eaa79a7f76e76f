"""The one mapping from errors to HTTP status and OpenAI-style error bodies.

Every error response is ``{"error": {"message", "type", "param", "code"}}``. 400 for any
invalid body (FastAPI's 422 included), 401 for a missing or wrong API key, 404 for an unknown
model, 413 for a body over the size limit, 429/503 for overload (with ``Retry-After``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from disagg.errors import (
    DisaggError,
    InvalidRequestError,
    KVMismatchError,
    KVTransferError,
    UnknownModelError,
)


@dataclass(frozen=True)
class APIError:
    """An error as the API reports it."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def invalid_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, "invalid_request")


def from_validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    raised = first.get("ctx", {}).get("error")
    if isinstance(raised, InvalidRequestError):  # a validator's own message and param
        return invalid_request(str(raised), raised.param)
    param = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or None
    return invalid_request(f"{param or 'body'}: {first['msg']}", param)


def from_exception(error: Exception) -> APIError:
    """Map an engine error to the API; anything unexpected is a 500 with a generic message."""
    if isinstance(error, ValidationError):
        return from_validation_error(error)
    if isinstance(error, UnknownModelError):
        return APIError(404, str(error), "invalid_request_error", "model", "model_not_found")
    if isinstance(error, InvalidRequestError):
        return invalid_request(str(error), error.param)
    if isinstance(error, (KVMismatchError, KVTransferError)):
        return APIError(500, str(error), "server_error", None, "kv_transfer_failed")
    if isinstance(error, DisaggError):
        return APIError(500, str(error), "server_error", None, "internal_error")
    return APIError(500, "internal server error", "server_error", None, "internal_error")


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", "invalid_request_error", None,
                    "request_too_large")


def body_timeout(timeout_s: float) -> APIError:
    return APIError(408, f"the request body did not arrive within {timeout_s} s",
                    "invalid_request_error", None, "request_timeout")


def unsupported_media_type(content_type: str | None) -> APIError:
    return APIError(415, f"Content-Type must be application/json, not {content_type!r}",
                    "invalid_request_error", None, "unsupported_media_type")


def from_http_status(status: int, method: str, path: str) -> APIError:
    """The framework's own errors (unknown path, wrong method) in the same shape."""
    if status == 404:
        return APIError(404, f"no such endpoint: {method} {path}", "invalid_request_error",
                        None, "not_found")
    if status == 405:
        return APIError(405, f"method {method} is not allowed on {path}",
                        "invalid_request_error", None, "method_not_allowed")
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, f"HTTP {status} on {method} {path}", kind, None, None)
