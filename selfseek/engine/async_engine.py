"""The asyncio front the server uses: add_request() -> async iterator of deltas; abort().

The engine loop runs in its own thread, apart from the HTTP event loop, so a long forward pass never
blocks accepting requests. Its deltas carry token ids only: a second thread, the output processor
(engine/output_processor.py), turns them into text, stop strings and finishes, so detokenizing never
slows a step; it tells the engine to stop a completion a stop string ended. Deltas cross back to each
request's event loop through loop.call_soon_threadsafe.

Failures are typed (engine/errors.py) and contained: a request that fails while being added or inside a
step gets a final delta whose `error` is a RequestFailed (or the RequestError it raised) and the others
go on. If the loop itself cannot go on (its thread died, or steps keep failing), `healthy` turns False,
every open stream ends with EngineDead and add_request raises EngineDead at once: no request ever hangs.
Admission: `max_queue` bounds the requests still waiting for their first output (Overloaded beyond);
`max_buffered_deltas` bounds what a consumer may leave unread before its request is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from selfseek.engine.errors import EngineDead, EngineError, Overloaded, RequestError, RequestFailed
from selfseek.engine.output_processor import OutputProcessor, RequestDelta
from selfseek.sampling_params import SamplingParams

log = logging.getLogger("selfseek.engine")
MAX_CONSECUTIVE_STEP_FAILURES = 3  # steps in a row that raise past the engine's own isolation: it is broken


@dataclass
class _Subscriber:
    loop: asyncio.AbstractEventLoop
    n: int = 1
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False  # a delta has arrived: no longer counted as waiting
    closed: bool = False  # ended early (aborted, too slow, engine dead): later deltas are dropped
    final_sent: set[int] = field(default_factory=set)  # completions whose final delta was queued


class AsyncEngine:
    """Runs a synchronous engine core in a background thread.

    The core's interface: prepare(prompt, params) -> prompt ids (validates; raises RequestError),
    add_request(id, prompt_ids, params), abort(id), stop_sequence(id, index), fail_request(id, exception),
    has_work(), step() -> [RequestDelta] (token ids, no text), fail_all(error) -> [RequestDelta], stats() ->
    dict. Only the engine thread touches the core's state; requests, aborts and stops reach it through an
    inbox, so the event loop never waits on a forward pass.
    """

    def __init__(self, core, max_queue: int | None = None, max_buffered_deltas: int | None = None):
        self.core = core
        self.tokenizer = core.tokenizer
        self.config = core.config
        args = getattr(core, "args", None)
        self.max_queue = max_queue if max_queue is not None else getattr(args, "max_queue", None)
        self.max_buffered_deltas = max_buffered_deltas or getattr(args, "max_buffered_deltas", 4096)
        self._subs: dict[str, _Subscriber] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._dead: EngineDead | None = None
        self._stats: dict = core.stats()
        self.processor = OutputProcessor(core.tokenizer)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # engine deltas for the output thread; None: stop
        self._thread = threading.Thread(target=self._run, name="selfseek-engine", daemon=True)
        self._output_thread = threading.Thread(target=self._run_output, name="selfseek-output", daemon=True)
        self._thread.start()
        self._output_thread.start()

    @property
    def healthy(self) -> bool:
        """False once the engine cannot serve (its loop died or was shut down): /health answers 503."""
        return self._dead is None and self._thread.is_alive() and self._output_thread.is_alive()

    def num_waiting(self) -> int:
        """Requests accepted that have produced no output yet (queued, or in their first prefill)."""
        return sum(1 for s in self._subs.values() if not s.started)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestDelta]:
        """Queue a request and iterate its deltas until all n completions end. Raises at once: RequestError
        for bad input, Overloaded when max_queue requests are already waiting, EngineDead when the engine
        has stopped."""
        if not self.healthy:
            raise self._dead or EngineDead("the engine loop is not running")
        if request_id in self._subs:
            raise RequestError(f"request id {request_id!r} is already running", param="request_id")
        if self.max_queue is not None and self.num_waiting() >= self.max_queue:
            raise Overloaded(f"{self.max_queue} requests are already waiting; retry shortly")
        prompt_ids = self.core.prepare(prompt, params)
        sub = _Subscriber(asyncio.get_running_loop(), n=params.n)
        self._subs[request_id] = sub
        self.processor.add_request(request_id, prompt_ids, params)
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        if not self.healthy:  # it died between the check above and now: _die may have missed this stream
            self._end(sub, request_id, self._dead or EngineDead("the engine loop is not running"))
        return self._stream(request_id, sub)

    async def _stream(self, request_id: str, sub: _Subscriber) -> AsyncIterator[RequestDelta]:
        open_completions = sub.n
        try:
            while open_completions > 0:
                delta: RequestDelta = await sub.queue.get()
                if delta.finish_reason is not None:
                    open_completions -= 1
                yield delta
        finally:
            if open_completions > 0 and not sub.closed:  # the consumer went away (client disconnected)
                self.abort(request_id)
            if self._subs.get(request_id) is sub:
                del self._subs[request_id]
                self.processor.remove(request_id)

    def abort(self, request_id: str) -> None:
        sub = self._subs.pop(request_id, None)  # also when its stream was never iterated (its finally never runs)
        if sub is not None:
            sub.closed = True
        self.processor.remove(request_id)
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        """A snapshot taken after the last engine step."""
        return self._stats

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._outbox.put(None)
        self._output_thread.join(timeout=10)
        self._die(EngineDead("the engine was shut down"))

    # ---- delivery (runs on the subscriber's event loop) ---------------------------------------------
    def _deliver(self, sub: _Subscriber, d: RequestDelta) -> None:
        if sub.closed:
            return
        sub.started = True
        if d.finish_reason is None and sub.queue.qsize() >= self.max_buffered_deltas:
            # The consumer stopped reading: abort rather than buffer its whole output.
            self.abort(d.request_id)
            self._end(sub, d.request_id, RequestFailed(
                f"request {d.request_id} was aborted: its client left {sub.queue.qsize()} outputs unread"))
            return
        if d.finish_reason is not None:
            sub.final_sent.add(d.index)
        sub.queue.put_nowait(d)

    def _end(self, sub: _Subscriber, request_id: str, error: EngineError) -> None:
        """A final error delta for each of the request's completions not yet ended."""
        for i in range(sub.n):
            if i not in sub.final_sent:
                sub.final_sent.add(i)
                sub.queue.put_nowait(RequestDelta(request_id, i, [], "", finish_reason="abort", error=error))
        sub.closed = True

    def _send(self, deltas: list[RequestDelta]) -> None:
        """Engine thread: hand a step's deltas to the output thread."""
        if deltas:
            self._outbox.put(deltas)

    def _publish(self, deltas: list[RequestDelta]) -> None:
        for d in deltas:
            sub = self._subs.get(d.request_id)
            if sub is not None:
                sub.loop.call_soon_threadsafe(self._deliver, sub, d)

    def _die(self, error: EngineDead) -> None:
        """The engine cannot go on: refuse new requests, end every open stream with the error."""
        if self._dead is None:
            self._dead = error
        for request_id, sub in list(self._subs.items()):
            try:
                sub.loop.call_soon_threadsafe(self._end, sub, request_id, self._dead)
            except RuntimeError:  # its event loop is closed: nobody is waiting
                pass

    # ---- the engine thread ---------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                request_id, prompt_ids, params = msg[1:]
                try:
                    self.core.add_request(request_id, prompt_ids, params)
                except Exception as e:  # fails this request only
                    self._send(self._add_failed(request_id, params, e))
            elif msg[0] == "stop":
                self.core.stop_sequence(msg[1], msg[2])
            else:
                self.core.abort(msg[1])

    def _add_failed(self, request_id: str, params: SamplingParams, cause: Exception) -> list[RequestDelta]:
        if isinstance(cause, EngineError):
            error = cause
        else:
            log.error("request %s failed while being added", request_id, exc_info=cause)
            error = RequestFailed(f"request {request_id} failed in the engine: {type(cause).__name__}")
            error.__cause__ = cause
        return [RequestDelta(request_id, i, [], "", finish_reason="abort", error=error) for i in range(params.n)]

    def _run(self) -> None:
        try:
            failures = 0
            while not self._stopped:
                self._drain_inbox()
                if not self.core.has_work():
                    self._stats = self.core.stats()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    deltas = self.core.step()
                    failures = 0
                except Exception as e:  # past the core's per-request isolation: fail what was running
                    failures += 1
                    log.error("an engine step failed (%d in a row)", failures, exc_info=e)
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES or isinstance(e, EngineDead):
                        raise
                    error = RequestFailed(f"engine error: {type(e).__name__}")
                    error.__cause__ = e
                    deltas = self.core.fail_all(error)
                self._stats = self.core.stats()
                self._send(deltas)
        except BaseException as e:
            log.critical("the engine loop died", exc_info=e)
            if isinstance(e, EngineDead):
                dead = e
            else:
                dead = EngineDead(f"the engine loop died: {type(e).__name__}")
                dead.__cause__ = e
            self._die(dead)

    # ---- the output thread ---------------------------------------------------------------------------
    def _run_output(self) -> None:
        try:
            while (deltas := self._outbox.get()) is not None:
                out, stops = self.processor.process(deltas)
                for request_id, index in stops:
                    self._inbox.put(("abort", request_id) if index is None else ("stop", request_id, index))
                if stops:
                    self._wake.set()
                self._publish(out)
        except BaseException as e:
            log.critical("the output processor died", exc_info=e)
            dead = EngineDead(f"the output processor died: {type(e).__name__}")
            dead.__cause__ = e
            self._die(dead)
