"""Helpers every route uses: body parsing with the error envelope, usage objects, waiting for a result
while watching for the client to leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from selfseek.engine.async_engine import RequestDelta
from selfseek.server.protocol import APIError
from selfseek.server.service import ModelService

M = TypeVar("M", bound=BaseModel)


def service(request: Request) -> ModelService:
    return request.app.state.service


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`: 413 when too large, 400 when not JSON, 422 naming the first bad field."""
    limit = service(request).config.max_request_bytes
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
    try:
        data = json.loads(body)  # Python's parser: NaN reaches validation, which names the field
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        param, message = _describe(e)
        raise APIError(422, message, param=param, code="invalid_parameters") from e


def _describe(e: ValidationError) -> tuple[str, str]:
    """The field a validation error is about, as OpenAI writes it ("messages[0].content"), and a message.
    A value matching no member of a union fails once per member; the shared path is the field."""
    errors = e.errors()
    locs = [err["loc"] for err in errors]
    common = list(locs[0])
    for loc in locs[1:]:
        n = 0
        while n < min(len(common), len(loc)) and common[n] == loc[n]:
            n += 1
        common = common[:n]
    path = ""
    for part in common:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "dict", "list") and part[0].islower():
            path += f".{part}" if path else part
        else:  # a union member's tag: the field ends here
            break
    first = errors[0]
    detail = first["msg"] if len(locs) == 1 else f"{first['msg']} (or another allowed type)"
    return path or None, f"Invalid value for `{path or 'body'}`: {detail}"


def usage(prompt_tokens: int, cached: int, completion_tokens: int, reasoning_tokens: int) -> dict:
    """DeepSeek's usage object, with OpenAI's fields too (prompt_tokens_details is always present)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
        "prompt_cache_hit_tokens": cached,
        "prompt_cache_miss_tokens": prompt_tokens - cached,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


class ClientGone(Exception):
    pass


async def consume(request: Request, deltas: AsyncIterator[RequestDelta], on_delta: Callable[[RequestDelta], None],
                  poll: float = 1.0) -> None:
    """Feed every delta to on_delta; if the client disconnects first, cancel (which aborts the request
    and frees its KV blocks) and raise ClientGone."""

    async def run() -> None:
        async for d in deltas:
            on_delta(d)

    task = asyncio.ensure_future(run())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def engine_error(d: RequestDelta) -> APIError | None:
    """The error a failed delta carries (None for a request cut short for lack of KV cache, which ends
    with finish_reason insufficient_system_resource instead, as DeepSeek's API does)."""
    if d.error is None or is_resource_abort(d):
        return None
    return APIError(500, d.error, code="engine_error")


def is_resource_abort(d: RequestDelta) -> bool:
    return d.finish_reason == "abort" and d.error is not None and "KV cache" in d.error
