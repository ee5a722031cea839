"""The asyncio front the server uses: add_request() -> async iterator of deltas; abort().

The engine loop runs in its own thread, apart from the HTTP event loop, so a long forward pass never
blocks accepting requests; deltas cross back through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from selfseek.sampling_params import SamplingParams


@dataclass
class RequestDelta:
    """What one engine step produced for one completion of one request."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # tokens new since the last delta
    text: str  # text new since the last delta (a partial stop string is held back, never sent)
    logprobs: list[dict[int, float]] | None = None  # per new token: {id: logprob}, top first, chosen included
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the request failed inside the engine


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    open_completions: int = 1


class AsyncEngine:
    """Runs a synchronous engine core in a background thread.

    The core's interface: prepare(prompt, params) -> prompt ids (validates; raises ValueError),
    add_request(id, prompt_ids, params), abort(id), has_work(), step() -> [RequestDelta],
    fail_all(message) -> [RequestDelta], stats() -> dict. Only the engine thread touches the core's
    state; requests and aborts reach it through an inbox, so the event loop never waits on a forward pass.
    """

    def __init__(self, core):
        self.core = core
        self.tokenizer = core.tokenizer
        self.config = core.config
        self._subs: dict[str, _Subscriber] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._stats: dict = core.stats()
        self._thread = threading.Thread(target=self._run, name="selfseek-engine", daemon=True)
        self._thread.start()

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        """Queue a request (ValueError at once for bad input); iterate its deltas until all n completions end."""
        if request_id in self._subs:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_ids = self.core.prepare(prompt, params)
        sub = _Subscriber(asyncio.get_running_loop(), open_completions=params.n)
        self._subs[request_id] = sub
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return self._stream(request_id, sub)

    async def _stream(self, request_id: str, sub: _Subscriber) -> AsyncIterator[RequestDelta]:
        try:
            while sub.open_completions > 0:
                delta: RequestDelta = await sub.queue.get()
                if delta.finish_reason is not None:
                    sub.open_completions -= 1
                yield delta
        finally:
            if sub.open_completions > 0:  # the consumer went away (client disconnected): free its blocks
                self.abort(request_id)
            self._subs.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._subs.pop(request_id, None)  # also when its stream was never iterated (its finally never runs)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        """A snapshot taken after the last engine step."""
        return self._stats

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                self.core.add_request(*msg[1:])
            else:
                self.core.abort(msg[1])

    def _run(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.core.has_work():
                self._stats = self.core.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                deltas = self.core.step()
            except Exception as e:  # fail what was running, keep serving what comes next
                deltas = self.core.fail_all(f"engine error: {type(e).__name__}: {e}")
            self._stats = self.core.stats()
            for d in deltas:
                sub = self._subs.get(d.request_id)
                if sub is not None:
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, d)
