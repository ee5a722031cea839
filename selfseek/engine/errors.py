"""The engine's typed errors: the server maps each kind to an HTTP status, never by reading messages.

- RequestError: this request is wrong (a bad parameter, a prompt too long): 400, `param` names the field.
- Overloaded: no room now (the waiting queue is full): 429 with Retry-After.
- RequestFailed: this request failed inside the engine (its own fault or a fault while it ran); it fails
  alone and the engine keeps serving the rest: 500 with a generic message, the cause goes to the log.
- EngineDead: the engine cannot serve any more (its thread died, an unrecoverable error): 503, /health 503.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the errors the engine reports to its callers."""

    status = 500


class RequestError(EngineError, ValueError):
    status = 400

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


class Overloaded(EngineError):
    status = 429

    def __init__(self, message: str = "the server is at capacity; retry shortly", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(EngineError):
    status = 500


class EngineDead(EngineError):
    status = 503
