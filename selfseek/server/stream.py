"""The one loop every API route runs over a submitted request: engine deltas in, API-neutral events out.

A Generation owns a request's engine stream and its completions' output processors ("choices": openai.ChatChoice
splits reasoning, content and tool calls; openai.TextChoice keeps raw text), and does once what every route
needs: feeding each delta to its choice, mapping a failed delta to its APIError, counting cached prompt tokens
and the usage totals, keep-alive while nothing comes, watching a non-streaming client for a disconnect, and
aborting the request when the response ends early. The routes only render: OpenAI chat and completions SSE,
Ollama NDJSON, Anthropic events, and their non-streaming bodies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from selfseek.engine.async_engine import RequestDelta
from selfseek.server.common import ClientGone, engine_error, usage
from selfseek.server.service import ModelService
from selfseek.server.sse import with_keep_alive


@dataclass
class Event:
    """One engine delta, processed: `out` is what its choice's feed() made of it."""

    choice: Any
    out: Any
    delta: RequestDelta
    last: bool  # every completion has finished: the totals are final

    @property
    def finished(self) -> bool:
        return self.delta.finish_reason is not None


class Generation:
    """A submitted request's completions. A choice has index, tokens, reasoning_tokens, finish_reason and
    feed(delta). per_prompt: completions per prompt (/completions with several prompts: choice i belongs to
    prompt i // per_prompt), for the cached-token count."""

    def __init__(self, svc: ModelService, deltas: AsyncIterator[RequestDelta], choices: list, prompt_tokens: int,
                 abort: Callable[[], None], per_prompt: int | None = None):
        self.svc, self.deltas, self.choices, self.prompt_tokens = svc, deltas, choices, prompt_tokens
        self.abort = abort
        self.per_prompt = per_prompt or len(choices)
        self.cached: dict[int, int] = {}  # prompt -> prompt tokens read from the prefix cache
        self.open = len(choices)
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.last: RequestDelta | None = None  # the latest delta

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.cached_tokens, sum(c.tokens for c in self.choices),
                     sum(c.reasoning_tokens for c in self.choices))

    async def events(self, keep_alive: bool = True) -> AsyncIterator[Event | None]:
        """Events in engine order; None each keep-alive interval without one (with `keep_alive`). A failed
        delta raises its APIError (streaming renderers turn it into their error event)."""
        source = with_keep_alive(self.deltas, self.svc.config.keep_alive_interval) if keep_alive else self.deltas
        async for d in source:
            if d is None:
                yield None
                continue
            if (err := engine_error(d)) is not None:
                raise err
            if d.index % self.per_prompt == 0 and d.num_cached_tokens:  # siblings share the prompt's count
                group = d.index // self.per_prompt
                self.cached[group] = max(self.cached.get(group, 0), d.num_cached_tokens)
            if d.token_ids and self.first_token is None:
                self.first_token = time.perf_counter()
            self.last = d
            choice = self.choices[d.index]
            out = choice.feed(d)
            if d.finish_reason is not None:
                self.open -= 1
            yield Event(choice, out, d, self.open == 0)

    async def collect(self, request: Request, poll: float = 1.0) -> None:
        """Run to the end for a non-streaming answer. Raises ClientGone (the app answers 499) when the client
        disconnects first, the APIError of a failed delta; either way the request is aborted, its KV blocks
        freed."""

        async def run() -> None:
            async for _ in self.events(keep_alive=False):
                pass

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
            if self.open:
                self.abort()
