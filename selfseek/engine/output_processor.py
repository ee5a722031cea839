"""The output processor: turns the engine's token-id deltas into text deltas, beside the engine's step loop.

The engine step only samples token ids and decides the finishes it can see in ids (a stop token, EOS,
max_tokens, the context length, an abort). Everything that needs text happens here, after the step: the
incremental detokenizer, stop strings (the text is cut before the stop string, and a partial stop string
at the end is held back, never sent), and the `stop` finish a stop string causes. The engine hears of such
a stop only afterwards, so it may have sampled a token or two past it: those are dropped here, and the
caller tells the engine to stop that completion (the `stops` process() returns). A failure here (in a
detokenizer) fails its request alone, as a failure inside a step does.

AsyncEngine runs it in its own thread; LLM.generate calls it after each step. It is thread-safe: requests
are added from the event loop while the output thread processes.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass

from selfseek.engine.errors import EngineError, RequestFailed
from selfseek.sampling_params import SamplingParams
from selfseek.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("selfseek.engine")


@dataclass
class RequestDelta:
    """What one engine step produced for one completion of one request. From the engine, `text` is empty;
    the output processor fills it in."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # tokens new since the last delta
    text: str  # text new since the last delta (a partial stop string is held back, never sent)
    logprobs: list[dict[int, float]] | None = None  # per new token: {id: logprob}, top first, chosen included
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Set on the final delta of a request that failed: RequestFailed (inside the engine), RequestError (bad
    # input found late), Overloaded (it cannot fit the KV cache), EngineDead (the engine stopped).
    error: EngineError | None = None

@dataclass
class _Completion:
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None = None  # built on its first output, off the caller's thread
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    done: bool = False  # its final delta went out; later engine deltas for it are dropped


class OutputProcessor:
    """Per completion: detokenize, match stop strings, hold back a partial stop string, finish on one."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._requests: dict[str, list[_Completion]] = {}
        self._lock = threading.Lock()

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            self._requests[request_id] = [_Completion(list(prompt_ids), params) for _ in range(params.n)]

    def remove(self, request_id: str) -> None:
        with self._lock:
            self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def process(self, deltas: list[RequestDelta]) -> tuple[list[RequestDelta], list[tuple[str, int | None]]]:
        """Engine deltas -> (deltas with text, what the engine must stop: (request id, index) of a completion a
        stop string ended, or (request id, None) for a request whose output failed here, which fails alone).
        Deltas of requests it does not know (never added, or removed) are dropped."""
        out: list[RequestDelta] = []
        stops: list[tuple[str, int | None]] = []
        with self._lock:
            for d in deltas:
                completions = self._requests.get(d.request_id)
                if completions is None or completions[d.index].done:
                    continue
                c = completions[d.index]
                try:
                    delta = self._process(c, d)
                except Exception as e:  # its detokenizer: fail this request alone, as a step failure would
                    log.error("request %s failed in the output processor", d.request_id, exc_info=e)
                    error = RequestFailed(f"request {d.request_id} failed in the engine: {type(e).__name__}")
                    error.__cause__ = e
                    for i, x in enumerate(completions):
                        if not x.done:
                            out.append(RequestDelta(d.request_id, i, [], "", finish_reason="abort", error=error))
                    del self._requests[d.request_id]
                    stops.append((d.request_id, None))
                    continue
                if delta.finish_reason is not None:
                    c.done = True
                    if d.finish_reason is None:  # ended here by a stop string; the engine still runs it
                        stops.append((d.request_id, d.index))
                    if all(x.done for x in completions):
                        del self._requests[d.request_id]
                out.append(delta)
        return out, stops

    def _process(self, c: _Completion, d: RequestDelta) -> RequestDelta:
        stops = c.params.stop
        if c.detokenizer is None and self.tokenizer is not None:
            c.detokenizer = IncrementalDetokenizer(self.tokenizer, c.prompt_ids, c.params.skip_special_tokens)
        token_ids, logprobs = d.token_ids, d.logprobs
        finish, stop_reason = d.finish_reason, d.stop_reason
        if c.detokenizer is not None:
            # A stop token ends the delta and is never text (its id is still reported).
            last = len(token_ids) - (finish == "stop" and isinstance(stop_reason, int))
            start = c.emitted
            for i, token in enumerate(token_ids[:last]):
                c.text += c.detokenizer.add(token)
                cut, stop = next(((k, s) for s in stops if (k := c.text.find(s, max(0, start - len(s)))) != -1),
                                 (-1, None))
                if stop is not None:
                    c.text, finish, stop_reason = c.text[:cut], "stop", stop
                    token_ids = token_ids[: i + 1]  # tokens the engine sampled past the stop are not output
                    logprobs = logprobs[: i + 1] if logprobs is not None else None
                    break
            if finish in ("stop", "length") and not isinstance(stop_reason, str):
                c.text += c.detokenizer.flush()
        final = finish is not None
        holdback = 0 if final else max((len(s) for s in stops), default=1) - 1
        end = max(c.emitted, len(c.text) - holdback)
        text, c.emitted = c.text[c.emitted : end], end
        return dataclasses.replace(d, token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish,
                                   stop_reason=stop_reason)


def step_with_text(engine, processor: OutputProcessor) -> list[RequestDelta]:
    """One synchronous engine step and its output processing (LLM.generate's loop, no threads): the deltas
    with text; completions a stop string ended are stopped in the engine, failed requests aborted."""
    deltas, stops = processor.process(engine.step())
    for request_id, index in stops:
        if index is None:
            engine.abort(request_id)
        else:
            engine.stop_sequence(request_id, index)
    return deltas
