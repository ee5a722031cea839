"""Streaming bodies: SSE events as DeepSeek and OpenAI send them, NDJSON lines as Ollama does, keep-alive
while a request waits, and cleanup that runs however the response ends (finished, failed, client gone).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from starlette.responses import StreamingResponse

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
KEEP_ALIVE = b": keep-alive\n\n"  # an SSE comment: clients skip lines that start with ":"


def sse_event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def ndjson_line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def with_keep_alive(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """source's items, and None each time `interval` seconds pass without one (queued, or a long prefill).

    The pending __anext__ runs as a task that a timeout never cancels: cancelling it would close the
    engine stream and abort the request."""
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(source.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except BaseException:  # noqa: B036 - the cancellation we asked for, or the stream's own end
                pass
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()


class Stream(StreamingResponse):
    """A StreamingResponse that calls `on_close` when it ends, even if the client left before the body
    started (then the body iterator never runs, and its own finally blocks with it)."""

    def __init__(self, content: AsyncIterator[bytes], media_type: str, on_close: Callable[[], None]):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
