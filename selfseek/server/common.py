"""Helpers every route uses: body parsing with the error envelope, usage objects, engine errors."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from selfseek.engine import errors
from selfseek.engine.async_engine import RequestDelta
from selfseek.server.errors import api_error, internal_error
from selfseek.server.protocol import APIError
from selfseek.server.service import ModelService

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("selfseek.server")


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
    except RecursionError as e:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from e
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_tree(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        param, message = _describe(e)
        raise APIError(422, message, param=param, code="invalid_parameters") from e


MAX_JSON_DEPTH = 64  # deeper bodies are refused: later recursive code (schemas, templates) must not overflow


def check_tree(data: object) -> None:
    """Refuse a body nested deeper than MAX_JSON_DEPTH and strings with lone UTF-16 surrogates ("\\ud800" is
    valid JSON but not Unicode: tokenizers and UTF-8 encoders raise on it), naming the field. Iterative, so
    depth cannot overflow the stack here."""
    stack: list[tuple[object, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", param=path or None,
                           code="invalid_json")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(k, path)
                stack.append((v, f"{path}.{k}" if path else k, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"`{path or 'body'}` holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}), which is "
                       "not valid Unicode", param=path or None, code="invalid_unicode") from e


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


def cache_salt(request: Request, explicit: str | None = None) -> str | None:
    """The prefix-cache tenant of a request: its API key (hashed, never kept) when the server has keys, plus
    the request's own `cache_salt`. Requests share cached prompt blocks only within one tenant, so neither a
    cache hit nor its timing tells one user what another sent; a salt cannot reach another key's cache."""
    parts = []
    if service(request).config.keys():
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "").partition(" ")[2].strip()
        parts.append(hashlib.sha256(key.encode()).hexdigest())
    if explicit:
        parts.append(explicit)
    return ":".join(parts) or None


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
    """The client of a non-streaming request disconnected before its answer: the app answers 499."""


def engine_error(d: RequestDelta) -> APIError | None:
    """The error a failed delta carries (None for a request cut short for lack of KV cache, which ends
    with finish_reason insufficient_system_resource instead, as DeepSeek's API does). The engine's own
    text for a failure goes to the log, the client gets a generic 500 (or the typed status)."""
    if d.error is None or is_resource_abort(d):
        return None
    if isinstance(d.error, BaseException):
        return api_error(d.error, d.request_id)
    log.error("request %s failed in the engine: %s", d.request_id, d.error)
    return internal_error(d.request_id)


def is_resource_abort(d: RequestDelta) -> bool:
    if d.finish_reason != "abort" or d.error is None:
        return False
    if isinstance(d.error, BaseException):
        return isinstance(d.error, errors.Overloaded)
    return "KV cache" in d.error  # an engine that still reports this abort as text
