"""Typed errors of the engine.

Each maps to one HTTP status at the serving edge (400 for a bad request, 404 for an unknown
model); the CLI prints the message and exits non-zero. Messages are written for the user.
"""

from __future__ import annotations


class DisaggError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(DisaggError, ValueError):
    """The request itself is wrong (empty prompt, max_tokens < 1, text to a token-id model)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """prompt + max_tokens does not fit the model's context."""


class UnknownModelError(DisaggError, LookupError):
    """The model name names no local directory, embedded model or random config."""


class ModelPreparationError(DisaggError, RuntimeError):
    """The embedded model could not be located or converted."""


class PoolCapacityError(InvalidRequestError):
    """The request (prompt + max_tokens) can never fit the decode KV pool."""


class KVPoolMemoryError(DisaggError, MemoryError):
    """The decode KV pool asked for does not fit the device's free memory."""


class ReplicaMemoryError(DisaggError, MemoryError):
    """A replica's start (its warm-up) does not fit the device's free memory."""


class KVMismatchError(DisaggError):
    """Received KV was produced for another model, dtype, layout or prompt."""


class KVTransferError(DisaggError):
    """A KV pull failed, expired or was aborted."""
