"""Engine exceptions -> HTTP errors, by kind (selfseek.engine.errors), never by reading messages."""

from __future__ import annotations

import logging
import math

from selfseek.engine import errors
from selfseek.server.protocol import APIError

log = logging.getLogger("selfseek.server")


def internal_error(request_id: str) -> APIError:
    """The body of every 500: a generic message and the id to find the traceback by in the server log (an
    exception's text can hold paths, prompts of other users or tensor contents, so it never reaches a client)."""
    return APIError(500, f"The server had an error while processing the request (request id {request_id}); "
                    "the details are in the server log.", code="internal_error")


def api_error(exc: BaseException, request_id: str) -> APIError:
    """The HTTP error for an engine exception, by its kind (selfseek.engine.errors), never by its message."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, errors.RequestError):
        return APIError(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))
    if isinstance(exc, errors.Overloaded):
        retry = max(1, math.ceil(getattr(exc, "retry_after", 1.0)))
        return APIError(429, str(exc) or "the server is at capacity; retry shortly", code="overloaded",
                        headers={"Retry-After": str(retry)})
    if isinstance(exc, errors.EngineDead):
        return APIError(503, "the inference engine has stopped; this server cannot answer requests",
                        code="engine_unavailable")
    log.error("request %s failed: %s", request_id, exc, exc_info=exc)
    return internal_error(request_id)
